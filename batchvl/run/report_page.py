"""The report's page: one HTML file with its CSS, script, chart (inline SVG) and thumbnails (data: URIs) inside,
so it can be mailed or opened from anywhere. Every value from the output is escaped."""

from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path

from batchvl.run.report import ERROR_CHARS, TEXT_CHARS, Card, Gathered

CHART_BINS = 40

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2430}
header{background:#1d2430;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:12px}
main{padding:16px 24px;max-width:1400px}
section{background:#fff;border-radius:8px;padding:14px 18px;margin:0 0 16px;box-shadow:0 1px 2px #0002}
h2{font-size:16px;margin:0 0 10px}
.stats{display:flex;flex-wrap:wrap;gap:12px}.stat{background:#f4f5f7;border-radius:6px;padding:8px 14px;min-width:110px}
.stat b{display:block;font-size:20px}.stat span{color:#5b6575;font-size:12px}
.note{color:#5b6575;font-size:12px;margin:6px 0}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:3px 8px;border-bottom:1px solid #e6e8ec;
vertical-align:top}th{color:#5b6575;font-weight:600}
.bar{background:#d9534f;height:10px;border-radius:2px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.filter{display:flex;gap:8px;align-items:center;margin-bottom:10px}
.filter input{flex:1;padding:6px 8px;font-size:14px}.filter select{padding:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:10px}
.card{border:1px solid #e0e3e8;border-radius:6px;padding:8px;background:#fff;overflow:hidden}
.card.err{border-color:#d9534f;background:#fff6f6}
.thumbs{display:flex;flex-wrap:wrap;gap:4px;margin-bottom:6px}.thumbs img{max-width:160px;max-height:160px;
border-radius:3px}
.id{font:12px monospace;color:#5b6575;word-break:break-all}.kind{float:right;font-size:11px;padding:0 6px;
border-radius:8px;background:#e6f4ea;color:#1e7b34}.err .kind{background:#fbe3e3;color:#a52a2a}
.text{white-space:pre-wrap;word-break:break-word;max-height:220px;overflow:auto;margin-top:4px}
.meta{font-size:11px;color:#5b6575;margin-top:4px}.missing{font-size:11px;color:#a52a2a}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px}
"""

# Filters the cards and the failed rows by the text box (id, text, error) and the kind list.
_JS = """
(function(){
  var box=document.getElementById('q'), kind=document.getElementById('kind'), count=document.getElementById('shown');
  function apply(){
    var q=box.value.toLowerCase(), k=kind.value, n=0;
    document.querySelectorAll('[data-search]').forEach(function(el){
      var hit=(!q||el.getAttribute('data-search').indexOf(q)>=0)&&(!k||el.getAttribute('data-kind')===k);
      el.style.display=hit?'':'none'; if(hit&&el.classList.contains('card'))n++;
    });
    count.textContent=n+' card(s) shown';
  }
  box.addEventListener('input',apply); kind.addEventListener('change',apply); apply();
})();
"""


def render(g: Gathered) -> str:
    """The page, as text."""
    title = f"batchvl report: {g.out_dir.name or g.out_dir}"
    body = [f"<header><h1>{escape(title)}</h1><p>{escape(str(g.out_dir.resolve()))} &middot; made "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p></header><main>",
            _summary(g), f"<div class=cols>{_kinds(g)}{_throughput(g)}</div>", _grid(g), _errors(g), _settings(g),
            "</main>"]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_JS}</script></body></html>")


def write_report(g: Gathered, dest: Path) -> int:
    """Write the page to `dest` (through a temporary file); returns its size in bytes."""
    data = render(g).encode("utf-8", "backslashreplace")
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return len(data)


def _stat(value: str, label: str) -> str:
    return f"<div class=stat><b>{escape(value)}</b><span>{escape(label)}</span></div>"


def _summary(g: Gathered) -> str:
    span = _span(g)
    rate = f"{g.rows / span:,.2f}" if span > 0 else "n/a"
    stats = [_stat(f"{g.rows:,}", "rows"), _stat(f"{g.ok:,}", "ok"), _stat(f"{sum(g.failed.values()):,}", "failed"),
             _stat(f"{g.prompt_tokens:,}", "prompt tokens"), _stat(f"{g.output_tokens:,}", "output tokens"),
             _stat(f"{len(g.commits):,}", "part files"), _stat(rate, "rows/s, first to last commit")]
    damaged = "".join(f"<p class=missing>damaged part, not counted: {escape(d)}</p>" for d in g.damaged)
    return f"<section><h2>Summary</h2><div class=stats>{''.join(stats)}</div>{damaged}</section>"


def _kinds(g: Gathered) -> str:
    if not g.failed:
        return "<section><h2>Errors by kind</h2><p>No row failed.</p></section>"
    most = max(g.failed.values())
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{n:,}</td><td style='width:50%'><div class=bar "
                   f"style='width:{100 * n / most:.1f}%'></div></td></tr>"
                   for k, n in sorted(g.failed.items(), key=lambda kv: -kv[1]))
    return (f"<section><h2>Errors by kind</h2><table><tr><th>kind</th><th>rows</th><th></th></tr>{rows}</table>"
            f"<p class=note>Counted over every row of every part.</p></section>")


def _span(g: Gathered) -> float:
    if len(g.commits) < 2:
        return 0.0
    times = [t for t, _ in g.commits]
    return max(times) - min(times)


def _throughput(g: Gathered) -> str:
    note = ("<p class=note>From the part files: each is renamed into place when committed, so its modification "
            "time is its commit time and its rows were done by then. Rows per second in equal time bins from the "
            "first commit to the last (the bars); committed rows so far (the line). Time between runs of a resumed "
            "folder is included.</p>")
    if len(g.commits) < 2 or _span(g) <= 0:
        return f"<section><h2>Throughput over time</h2><p>Fewer than two commits: no chart.</p>{note}</section>"
    commits = sorted(g.commits)
    t0, span = commits[0][0], _span(g)
    bins = [0] * min(CHART_BINS, len(commits))
    for t, n in commits:
        bins[min(int((t - t0) / span * len(bins)), len(bins) - 1)] += n
    width = span / len(bins)
    rates = [n / width for n in bins]
    top = max(rates) or 1.0
    w, h, pad = 560, 180, 36
    bw = (w - pad) / len(bins)
    bars = "".join(f"<rect x='{pad + i * bw:.1f}' y='{h - 20 - (h - 30) * r / top:.1f}' width='{bw * 0.85:.1f}' "
                   f"height='{(h - 30) * r / top:.1f}' fill='#4a7bd0'><title>{r:,.2f} rows/s</title></rect>"
                   for i, r in enumerate(rates))
    total, done, points = sum(n for _, n in commits), 0, []
    for t, n in commits:
        done += n
        points.append(f"{pad + (w - pad) * (t - t0) / span:.1f},{h - 20 - (h - 30) * done / total:.1f}")
    svg = (f"<svg width='{w}' height='{h}' viewBox='0 0 {w} {h}' role=img aria-label='rows per second over time'>"
           f"{bars}<polyline points='{' '.join(points)}' fill='none' stroke='#e08a00' stroke-width='2'/>"
           f"<line x1='{pad}' y1='{h - 20}' x2='{w}' y2='{h - 20}' stroke='#888'/>"
           f"<text x='0' y='14' font-size='11'>{top:,.1f}/s</text><text x='{pad}' y='{h - 4}' font-size='11'>0 s"
           f"</text><text x='{w - 60}' y='{h - 4}' font-size='11'>{span:,.0f} s</text></svg>")
    return f"<section><h2>Throughput over time</h2>{svg}{note}</section>"


def _card(c: Card) -> str:
    text = c.text if c.error is None else c.error
    shown = (text or "")[:TEXT_CHARS] + ("…" if text and len(text) > TEXT_CHARS else "")
    search = escape(f"{c.label} {c.kind} {text or ''}".lower()[:TEXT_CHARS + 200])
    thumbs = "".join(f"<img src='{t}' alt='{escape(c.label)}'>" for t in c.thumbs)
    missing = "".join(f"<div class=missing>{escape(m)}</div>" for m in c.media)
    return (f"<div class='card{' err' if c.error else ''}' data-search='{search}' data-kind='{escape(c.kind)}'>"
            f"{f'<div class=thumbs>{thumbs}</div>' if thumbs else ''}{missing}<span class=kind>{escape(c.kind)}"
            f"</span><div class=id>{escape(c.label)}</div><div class=text>{escape(shown)}</div><div class=meta>"
            f"{c.prompt_tokens} prompt + {c.output_tokens} output tokens"
            f"{', ' + escape(c.finish_reason) if c.finish_reason and not c.error else ''}</div></div>")


def _grid(g: Gathered) -> str:
    if g.rows <= g.sample_size:
        how = f"showing all {g.rows:,} rows, in part order"
    else:
        how = (f"showing {len(g.sample):,} of {g.rows:,} rows, sampled uniformly with seed {g.seed} "
               f"(reservoir sampling over the parts in name order)")
    if g.samples > 1:
        how += (f"; with {g.samples} samples per input row, a row here is one (id, sample), labelled with its "
                "sample")
    kinds = "".join(f"<option value='{escape(k)}'>{escape(k)}</option>" for k in ["ok", *sorted(g.failed)])
    cards = "".join(_card(c) for c in g.sample)
    return (f"<section><h2>Rows</h2><p class=note>{escape(how)}. {escape(g.media_note)}</p>"
            f"<div class=filter><input id=q type=search placeholder='filter by text, id or error kind'>"
            f"<select id=kind><option value=''>every kind</option>{kinds}</select><span id=shown></span></div>"
            f"<div class=grid>{cards}</div></section>")


def _errors(g: Gathered) -> str:
    failed = sum(g.failed.values())
    if not failed:
        return ""
    how = f"all {failed:,} failed rows" if len(g.errors) == failed else \
        f"the first {len(g.errors):,} of {failed:,} failed rows, in part order (the counts by kind cover them all)"
    rows = "".join(f"<tr class=errrow data-search='{escape(f'{c.label} {c.kind} {c.error}'.lower()[:ERROR_CHARS])}' "
                   f"data-kind='{escape(c.kind)}'><td class=id>{escape(c.label)}</td><td>{escape(c.kind)}</td>"
                   f"<td><pre>{escape((c.error or '')[:ERROR_CHARS])}</pre></td></tr>" for c in g.errors)
    return (f"<section><h2>Failed rows</h2><p class=note>{escape(how)}.</p><table id=errors><tr><th>id</th>"
            f"<th>kind</th><th>reason</th></tr>{rows}</table></section>")


def _settings(g: Gathered) -> str:
    fp = "".join(f"<tr><td>{escape(k)}</td><td><pre>{escape(_short(v))}</pre></td></tr>"
                 for k, v in g.fingerprint.items())
    runs = "".join(f"<tr><td>{escape(str(s.get('file')))}</td><td><pre>{escape(json.dumps(s, indent=1))}</pre></td>"
                   "</tr>" for s in g.summaries)
    return (f"<section><h2>Job settings</h2><p class=note>The fingerprint the folder records (_batchvl.json): what "
            f"decides a row's text. Hashes are shortened.</p><table>{fp or '<tr><td>none recorded</td></tr>'}"
            f"</table><h2 style='margin-top:14px'>Runs</h2><p class=note>The summary files (_summary*.json), as "
            f"their runs last wrote them.</p><table>{runs or '<tr><td>none</td></tr>'}</table></section>")


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return value if isinstance(value, str) else json.dumps(value)
