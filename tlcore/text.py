"""Plain-text output shared by the sweeps and the command-line tools: Markdown tables that read the
same in a terminal, a log file and MLflow's artifact view."""


def format_table(rows: list[dict]) -> str:
    """Rows as a Markdown table (readable in a terminal, a log file and MLflow's artifact view)."""
    if not rows:
        return "(no trials)"
    cols = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
