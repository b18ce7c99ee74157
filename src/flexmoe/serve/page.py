"""The owner page: one HTML file with inline script (no CDN: works offline) and a server-drawn SVG chart."""

from __future__ import annotations

from html import escape


def usage_svg(rows: list[dict], width: int = 640, height: int = 240) -> str:
    """Tokens attributed per day as an inline SVG bar chart (one bar per day)."""
    days: dict[str, float] = {}
    for r in rows:
        days[r["day"]] = days.get(r["day"], 0.0) + r["tokens"]
    pad, top = 40, max(days.values(), default=0.0) or 1.0
    n = max(len(days), 1)
    bw = (width - 2 * pad) / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="usage-chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="tokens attributed per day">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
        f'<text x="{pad}" y="16" font-size="12">tokens per day (max {top:.1f})</text>',
    ]
    for i, (day, tokens) in enumerate(sorted(days.items())):
        h = (height - 2 * pad) * tokens / top
        x = pad + i * bw + 2
        parts.append(
            f'<rect class="bar" data-day="{escape(day)}" data-tokens="{tokens:.3f}" x="{x:.1f}" '
            f'y="{height - pad - h:.1f}" width="{max(bw - 4, 1):.1f}" height="{h:.1f}" fill="#3b7dd8"/>'
        )
        parts.append(f'<text x="{x:.1f}" y="{height - pad + 14}" font-size="10">{escape(day[5:])}</text>')
    if not days:
        parts.append(f'<text x="{pad}" y="{height / 2}" font-size="12">no usage yet</text>')
    parts.append("</svg>")
    return "".join(parts)


OWNER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flexmoe owner</title>
<style>body{font-family:sans-serif;max-width:720px;margin:2em auto}#panel{display:none}
button{margin-right:.5em}.on{color:#070}.off{color:#a00}</style></head>
<body><h1>flexmoe: your expert</h1>
<form id="login"><label>Owner key <input id="key" type="password" autocomplete="off" size="48"></label>
<button id="login-btn" type="submit">Log in</button></form>
<p id="error" role="alert"></p>
<div id="panel">
<p>Owner <b id="owner"></b>, expert <b id="expert"></b>: <span id="status"></span></p>
<button id="disable">Switch off</button><button id="enable">Switch on</button>
<h2>Usage over time</h2><div id="chart"></div><table id="days"></table>
</div>
<script>
let key = "";
async function api(path, opts) {
  const r = await fetch(path, Object.assign({headers: {"Authorization": "Bearer " + key}}, opts || {}));
  if (!r.ok) {
    let m = r.status + "";
    try { m = (await r.json()).error.message; } catch (e) {}
    throw new Error(m);
  }
  return r;
}
async function refresh() {
  const me = await (await api("/v1/owner/me")).json();
  document.getElementById("owner").textContent = me.owner;
  document.getElementById("expert").textContent = me.expert;
  const s = document.getElementById("status");
  s.textContent = me.enabled ? "on" : "off"; s.className = me.enabled ? "on" : "off";
  document.getElementById("chart").innerHTML = await (await api("/v1/owner/usage?format=svg")).text();
  const u = await (await api("/v1/owner/usage")).json();
  document.getElementById("days").innerHTML = "<tr><th>day</th><th>requests</th><th>tokens</th></tr>" +
    u.days.map(d => `<tr><td>${d.day}</td><td>${d.requests}</td><td>${d.tokens}</td></tr>`).join("");
  document.getElementById("panel").style.display = "block";
  return me;
}
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault(); key = document.getElementById("key").value.trim();
  document.getElementById("error").textContent = "";
  try { await refresh(); }
  catch (e) { document.getElementById("error").textContent = "Login failed: " + e.message; }
});
for (const action of ["disable", "enable"]) {
  document.getElementById(action).addEventListener("click", async () => {
    const expert = document.getElementById("expert").textContent;
    try {
      await api(`/v1/experts/${encodeURIComponent(expert)}/${action}`, {method: "POST"});
      await refresh();
    }
    catch (e) { document.getElementById("error").textContent = e.message; }
  });
}
</script></body></html>
"""
