"""Rendering of attribution graphs (SVG through graphviz, interactive HTML)."""
