"""report.html for `compare`: one self-contained page (the two videos embedded, a few lines of inline script to
play them in sync, the metrics table, charts drawn as inline SVG); nothing is fetched from the network."""

import base64
import html as escape_html
import math

COLOURS = {"baseline": "#4c6ef5", "alg": "#e8590c"}
LABELS = {"baseline": "baseline", "alg": "ALG"}
# Where ALG changes little the two curves coincide: the baseline is drawn first, wide and solid, ALG over it
# narrow and dashed, so either shows through the other (points too: a large dot under a small one).
STROKES = {"baseline": dict(width=4, dash=None, dot=3.5), "alg": dict(width=2, dash="7 4", dot=2)}
DEFAULT_STROKE = dict(width=2, dash=None, dot=2.5)
WIDTH, HEIGHT = 480, 270  # chart size in CSS pixels
MARGIN = dict(left=62, right=14, top=30, bottom=44)


def esc(text) -> str:
    return escape_html.escape(str(text), quote=True)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + k * step for k in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def label(value: float) -> str:
    return f"{value:.3g}" if value != 0 else "0"


def line_chart(title: str, x_label: str, y_label: str, series: dict, log_y: bool = False,
               marker: tuple[float, str] | None = None) -> str:
    """An SVG line chart; series maps a run name to (xs, ys). `marker` draws a dashed vertical line (x, text)."""
    xs = [x for xs_, _ in series.values() for x in xs_]
    ys = [y for _, ys_ in series.values() for y in ys_]
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    if log_y:
        floor = min((y for y in ys if y > 0), default=1e-12)
        low, high = math.floor(math.log10(floor)), math.ceil(math.log10(max(max(ys), floor)))
        high = high if high > low else low + 1
        y_ticks = [10.0 ** k for k in range(low, high + 1)]
        y_of = lambda y: math.log10(max(y, 10.0 ** low))  # noqa: E731  (zeros sit on the bottom edge)
        y_range = (low, high)
    else:
        y_ticks = nice_ticks(min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0)
        y_of, y_range = (lambda y: y), (y_ticks[0], y_ticks[-1])
    x_ticks = nice_ticks(min(xs), max(xs))
    x_range = (x_ticks[0], x_ticks[-1])
    left, top = MARGIN["left"], MARGIN["top"]
    plot_w, plot_h = WIDTH - left - MARGIN["right"], HEIGHT - top - MARGIN["bottom"]

    def px(x):
        return left + (x - x_range[0]) / (x_range[1] - x_range[0]) * plot_w

    def py(y):
        return top + plot_h - (y_of(y) - y_range[0]) / (y_range[1] - y_range[0]) * plot_h

    parts = [f'<svg width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{esc(title)}">',
             f'<text x="{left}" y="18" class="title">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>']
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{py(y) + 4:.1f}" class="tick" text-anchor="end">{label(y)}</text>')
    for x in x_ticks:
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">'
                     f'{label(x)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{HEIGHT - 8}" class="axis" text-anchor="middle">'
                 f'{esc(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" class="axis" '
                 f'text-anchor="middle">{esc(y_label)}</text>')
    if marker is not None:
        parts.append(f'<line x1="{px(marker[0]):.1f}" x2="{px(marker[0]):.1f}" y1="{top}" y2="{top + plot_h}" '
                     f'class="marker"/><text x="{px(marker[0]) + 4:.1f}" y="{top + 12}" class="tick">'
                     f'{esc(marker[1])}</text>')
    wide_first = sorted(series, key=lambda name: -STROKES.get(name, DEFAULT_STROKE)["width"])  # stable
    for k, name in enumerate(wide_first):
        sx, sy = series[name]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy))
        colour, stroke = COLOURS.get(name, "#333"), STROKES.get(name, DEFAULT_STROKE)
        style = f'stroke="{colour}" stroke-width="{stroke["width"]}"' + \
            (f' stroke-dasharray="{stroke["dash"]}"' if stroke["dash"] else "")
        parts.append(f'<polyline points="{points}" fill="none" {style} stroke-linejoin="round"/>')
        if len(sx) <= 40:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{stroke["dot"]}" fill="{colour}"/>'
                      for x, y in zip(sx, sy)]
        lx = WIDTH - MARGIN["right"] - 172 + 90 * k  # the legend: one row above the plot, right-aligned
        parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{top - 8}" y2="{top - 8}" {style}/>'
                     f'<text x="{lx + 27}" y="{top - 4}" class="legend">{esc(LABELS.get(name, name))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def charts(report: dict) -> list[str]:
    """Flow magnitude over time, both motion spectra, both residual spectra."""
    from .motion import CUTOFF_CYCLES_PER_PX

    runs = report["runs"]
    fps = report["settings"]["fps"]
    flow = {n: ([(i + 0.5) / fps for i in range(len(r["motion"]["flow"]["per_pair_px"]))],
                r["motion"]["flow"]["per_pair_px"]) for n, r in runs.items()}
    spectrum = {n: (r["motion"]["spectrum"]["freqs_hz"], r["motion"]["spectrum"]["amplitude_px"])
                for n, r in runs.items()}
    residual = {n: (r["residual_bands"]["bands_cycles_per_px"], r["residual_bands"]["band_energy"])
                for n, r in runs.items()}
    return [
        line_chart("Flow magnitude over time", "time (s)", "mean flow (px/frame)", flow),
        line_chart("Motion spectrum", "temporal frequency (Hz)", "amplitude (px)",
                   spectrum),
        line_chart("Residual spectrum", "spatial frequency (cycles/px)", "energy (mean r²)", residual,
                   log_y=True, marker=(CUTOFF_CYCLES_PER_PX, "low | high")),
    ]


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1020px; color: #212529; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; }
.prompt { color: #495057; margin: 0 0 16px; }
.videos { display: flex; gap: 12px; } .videos figure { margin: 0; flex: 1; }
.videos video { width: 100%; background: #000; display: block; }
figcaption { font-weight: 600; margin: 4px 0; } .controls { margin: 10px 0; display: flex; gap: 10px; }
.controls input[type=range] { flex: 1; }
table { border-collapse: collapse; } td, th { padding: 4px 12px; border-bottom: 1px solid #dee2e6; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; }
svg .title { font-size: 14px; font-weight: 600; } svg .tick { font-size: 11px; fill: #495057; }
svg .axis { font-size: 12px; fill: #212529; } svg .legend { font-size: 12px; }
svg .plot { fill: #fff; stroke: #adb5bd; } svg .grid { stroke: #e9ecef; }
svg .marker { stroke: #868e96; stroke-dasharray: 4 3; }
.settings { font-size: 13px; color: #495057; white-space: pre-wrap; }
"""

SCRIPT = """
const a = document.getElementById('baseline'), b = document.getElementById('alg');
const play = document.getElementById('play'), seek = document.getElementById('seek');
play.onclick = () => { if (a.paused) { a.play(); b.play(); play.textContent = 'Pause'; }
                       else { a.pause(); b.pause(); play.textContent = 'Play both'; } };
a.ontimeupdate = () => { if (Math.abs(b.currentTime - a.currentTime) > 0.05) b.currentTime = a.currentTime;
                         if (a.duration) seek.value = 1000 * a.currentTime / a.duration; };
seek.oninput = () => { a.currentTime = b.currentTime = seek.value / 1000 * (a.duration || 0); };
let loaded = 0;  // both videos decodable: say so on the page (tests read it)
a.onloadeddata = b.onloadeddata = () => { if (++loaded === 2) document.body.dataset.videos = 'ready'; };
"""


ROWS = [  # (label, how to get it from a motion report, format)
    ("flow mean (px/frame)", lambda m: m["flow"]["mean_px"], "{:.3f}"),
    ("flow top 5% (px/frame)", lambda m: m["flow"]["top5_mean_px"], "{:.3f}"),
    ("dynamic degree (pairs over)", lambda m: m["dynamic_degree"]["score"], "{:.0%}"),
    ("dynamic (VBench rule)", lambda m: "yes" if m["dynamic_degree"]["dynamic"] else "no", "{}"),
    ("dominant motion (Hz)", lambda m: m["spectrum"]["dominant_hz"], "{:.2f}"),
    ("residual high-freq ratio", lambda m: m["residual"]["high_freq_ratio"], "{:.3f}"),
    ("frame 0 PSNR (dB)", lambda m: m["fidelity"]["first_frame_psnr"], "{:.2f}"),
    ("frame 0 SSIM", lambda m: m["fidelity"]["first_frame_ssim"], "{:.4f}"),
]


def rows(report: dict) -> list[tuple[str, str, str]]:
    """(label, baseline, ALG) rows of the metrics, timings last."""
    table = [(label, *(fmt.format(get(report["runs"][n]["motion"])) for n in LABELS)) for label, get, fmt in ROWS]
    for stage in ("denoise", "run"):
        table.append((f"{stage} time (s)", *(f"{report['runs'][n]['timings_s'].get(stage, 0.0):.3g}" for n in LABELS)))
    return table


def html(report: dict, videos: dict | None = None) -> str:
    """The page. `videos` maps "baseline" / "alg" to mp4 bytes to embed; without it, the page links the files
    named in the report (beside it)."""
    settings = report["settings"]
    figures = []
    for name in ("baseline", "alg"):
        source = (f"data:video/mp4;base64,{base64.b64encode(videos[name]).decode()}" if videos
                  else esc(report["runs"][name]["video"]))
        figures.append(f'<figure><figcaption>{LABELS[name]}</figcaption><video id="{name}" src="{source}" muted '
                       f'loop playsinline preload="auto"></video></figure>')
    table = "".join(f"<tr><td>{esc(label)}</td><td class=num>{esc(x)}</td><td class=num>{esc(y)}</td></tr>"
                    for label, x, y in rows(report))
    generation = ", ".join(f"{k} {v}" for k, v in settings["generation"].items())
    alg = settings["alg"]
    described = (f"ALG: {alg['lp_filter_type']} filter in {'latent' if alg['lp_filter_in_latent'] else 'pixel'} "
                 f"space, {alg['lp_strength_schedule_type']} schedule")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>minialg: baseline vs ALG</title>
<style>{STYLE}</style></head><body>
<h1>Baseline vs ALG</h1>
<p class="prompt">&ldquo;{esc(settings['prompt'])}&rdquo; &middot; seed {esc(settings['seed'])} &middot;
{esc(settings['fps'])} fps &middot; {esc(settings['model'])}</p>
<div class="videos">{''.join(figures)}</div>
<div class="controls"><button id="play">Play both</button><input id="seek" type="range" min="0" max="1000" value="0"
aria-label="position"></div>
<h2>Metrics</h2>
<table><tr><th></th><th class=num>baseline</th><th class=num>ALG</th></tr>{table}</table>
<h2>Charts</h2>
<div class="charts">{''.join(charts(report))}</div>
<h2>Settings</h2>
<p class="settings">{esc(generation)}
{esc(described)}; the baseline is the same run with use_low_pass_guidance false.
Measures: minialg.motion (pyramidal Lucas-Kanade flow; VBench-style dynamic degree; motion spectrum after
Generative Image Dynamics; residual spectrum after Spectral Motion Alignment; PSNR/SSIM of frame 0 vs the image).</p>
<script>{SCRIPT}</script>
</body></html>
"""
