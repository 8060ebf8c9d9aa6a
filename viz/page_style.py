"""The interactive page's stylesheet (inlined into every page: the page never loads anything)."""

PAGE_CSS = """
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; font: 13px/1.35 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  color: #1a202c; background: #f7fafc; }
body { display: flex; }
#canvas { flex: 1; overflow: auto; background: #fff; border-right: 1px solid #cbd5e0; position: relative; }
#canvas svg { display: block; }
#panel { width: 400px; overflow-y: auto; padding: 12px 14px; }
h1 { font-size: 15px; margin: 0 0 4px; word-break: break-word; }
h2 { font-size: 13px; margin: 14px 0 4px; border-bottom: 1px solid #e2e8f0; padding-bottom: 2px; }
.meta { color: #4a5568; font-size: 12px; }
.control { margin: 8px 0; }
.control label { display: flex; justify-content: space-between; font-size: 12px; color: #2d3748; }
.control input[type=range] { width: 100%; }
button { font-size: 12px; padding: 2px 8px; margin-right: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 12px; }
td { padding: 2px 4px; border-bottom: 1px solid #edf2f7; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.link { cursor: pointer; }
tr.link:hover { background: #ebf8ff; }
.pos { color: #2b6cb0; } .neg { color: #c53030; }
.hint { color: #718096; font-size: 12px; }
#details { font-size: 12px; word-break: break-word; }
#tooltip { position: fixed; pointer-events: none; background: #1a202c; color: #fff; padding: 4px 7px;
  border-radius: 4px; font-size: 12px; max-width: 420px; display: none; z-index: 10; }
#contexts .ctx { font-family: Menlo, Consolas, monospace; font-size: 11px; white-space: pre-wrap;
  border-bottom: 1px solid #edf2f7; padding: 2px 0; }
#contexts .peak { outline: 1px solid #c05621; font-weight: bold; }
.logits { font-size: 11px; color: #4a5568; margin-top: 4px; word-break: break-word; }
#errors { color: #c53030; white-space: pre-wrap; font-size: 12px; }
g.node { cursor: pointer; }
g.node text { font-size: 8px; text-anchor: middle; pointer-events: none; }
g.node.selected > :first-child { stroke: #d69e2e; stroke-width: 3; }
g.node.faded, g.mark.faded { opacity: 0.35; }
g.mark { cursor: pointer; }
g.mark.selected > :first-child { stroke: #d69e2e; stroke-width: 2; }
text.axis { font-size: 11px; fill: #718096; text-anchor: end; }
path.edge { fill: none; }
path.edge.faded { opacity: 0.12; }
"""
