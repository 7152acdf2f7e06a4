"""The report as one self-contained HTML page (plotly's JS and the CSS inlined: it opens offline, from a file or
an attachment) and as a markdown twin with the same tables. Text from the run (documents, samples, paths) is
escaped by Jinja2's autoescape; only plotly's own figure fragments go in unescaped."""
from __future__ import annotations

import jinja2

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>raylm report: {{ title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
nav a{margin-right:12px} h2{border-bottom:1px solid #ccc;padding-top:12px} .note{color:#555}
.missing{color:#999;font-style:italic} table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top;max-width:520px;
overflow-wrap:anywhere} th{background:#f4f4f4} td.pre{white-space:pre-wrap;font-family:monospace}
</style>
<script>{{ plotly_js | safe }}</script>
</head><body>
<h1>raylm report: {{ title }}</h1>
<p class="note">Run directory <code>{{ run }}</code>. Built from the files the run left there; a part the run
did not reach says <em>not run</em>.</p>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}</nav>
{% for s in sections %}
<section id="{{ s.id }}" class="report-section{% if s.missing %} not-run{% endif %}">
<h2>{{ s.title }}</h2><p class="note">{{ s.note }}</p>
{% if s.missing %}<p class="missing">{{ s.missing }}</p>{% endif %}
{% for f in s.figures %}<div class="figure">{{ f | safe }}</div>{% endfor %}
{% for caption, headers, rows in s.tables %}
{% if caption %}<h3>{{ caption }}</h3>{% endif %}
<table><thead><tr>{% for h in headers %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in rows %}<tr>{% for cell in row %}<td{% if cell|length > 60 %} class="pre"{% endif %}>{{ cell }}</td>
{% endfor %}</tr>{% endfor %}</tbody></table>
{% endfor %}
</section>
{% endfor %}
</body></html>
"""


def render_html(title: str, run: str, sections: list[dict]) -> str:
    from plotly.offline import get_plotlyjs

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    # "</script" inside the inlined library would end the tag early; plotly's bundle has none, checked here.
    plotly_js = get_plotlyjs()
    if "</script" in plotly_js.lower():
        raise RuntimeError("plotly.js contains '</script': it cannot be inlined as is")
    return env.from_string(PAGE).render(title=title, run=run, sections=sections, plotly_js=plotly_js)


def _md_cell(text: str) -> str:
    # a markdown table cell is one line, and "|" would end it
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) or " " for h in headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(title: str, run: str, sections: list[dict]) -> str:
    out = [f"# raylm report: {title}", "", f"Run directory `{run}`. The HTML twin (report.html) has the plots.", ""]
    for s in sections:
        out += [f"## {s['title']}", "", s["note"], ""]
        if s["missing"]:
            out += [f"_{s['missing']}_", ""]
        for caption, headers, rows in s["tables"]:
            if caption:
                out += [f"### {caption}", ""]
            out += [md_table(headers, rows), ""]
    return "\n".join(out)
