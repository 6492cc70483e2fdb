"""Tables for people: what the UI metadata and the Markdown reports share."""

import polars as pl


def markdown_table(frame: pl.DataFrame, float_format: str = "{:.4f}") -> str:
    """A frame as a Markdown table (floats rounded, pipes escaped)."""

    def cell(value: object) -> str:
        text = float_format.format(value) if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * frame.width + "\n"
    return head + "\n".join("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.rows())
