"""Small renderers for materialisation metadata shown in the Dagster UI."""

from lkg_pipeline.core.io.tables import markdown_table

__all__ = ["markdown_table", "png_markdown"]


def png_markdown(figure: "matplotlib.figure.Figure", alt: str) -> str:  # noqa: F821
    """A matplotlib figure inlined as a PNG in Markdown, so the UI shows it without a file."""
    import base64
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![{alt}](data:image/png;base64,{encoded})"
