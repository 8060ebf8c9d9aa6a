"""Colours shared by the SVG and the HTML page: edges by sign, node fills by kind."""

POSITIVE, NEGATIVE = "#2b6cb0", "#c53030"  # blue: the source pushes the target up; red: down
FILLS = {"token": "#e2e8f0", "logit": "#c6f6d5", "feature": "#feebc8", "error": "#e2e2e2",
         "remainder": "#edf2f7", "supernode": "#e9d8fd"}
