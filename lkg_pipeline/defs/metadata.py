"""Small renderers for materialisation metadata shown in the Dagster UI."""

import polars as pl


def markdown_table(frame: pl.DataFrame, float_format: str = "{:.4f}") -> str:
    """A frame as a Markdown table (floats rounded, pipes escaped)."""

    def cell(value: object) -> str:
        text = float_format.format(value) if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * frame.width + "\n"
    return head + "\n".join("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.rows())


def png_markdown(figure: "matplotlib.figure.Figure", alt: str) -> str:  # noqa: F821
    """A matplotlib figure inlined as a PNG in Markdown, so the UI shows it without a file."""
    import base64
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![{alt}](data:image/png;base64,{encoded})"
