"""Colours shared by the SVG and the HTML page: edges by sign (node fills are in :mod:`circuits.graph.node_kinds`)."""

POSITIVE, NEGATIVE = "#2b6cb0", "#c53030"  # blue: the source pushes the target up; red: down
