"""`qwenjax sae analyze RUN_DIR`: a static dashboard of a trained SAE's latents.

Over the run's held-out tokens (the first `eval_tokens` of its data stream, as in training):
for the `analyze_latents` most frequently firing latents, the top-activating contexts with each
token shaded by the latent's activation (the top token outlined), a histogram of its non-zero
activations (PNG), and its logit effects: the decoder direction through the final norm's scale
and the unembedding, the tokens it promotes and suppresses most. `index.html` lists the latents
and links one page per latent; `frequencies.png` is the log firing-frequency histogram of all.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from qwenjax.atomic import output_dir
from qwenjax.errors import ConfigError
from qwenjax.interp import activations as A
from qwenjax.interp import sae as S
from qwenjax.interp.experiment import sae_experiment_from_dict
from qwenjax.interp.run import load_model, token_stream
from qwenjax.interp.saelens import read_sae

STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}"
         ".ctx{font-family:monospace;white-space:pre-wrap;margin:.3em 0;padding:.2em;"
         "border-bottom:1px solid #ddd}.top{outline:2px solid #c00}td,th{padding:.2em .6em}")


def latent_stats(cfg, params, rows: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Latent activations z [N,F] of rows [N,D] (float32)."""
    enc = jax.jit(lambda p, x: S.encode(cfg, p, x))
    p = jax.tree.map(jnp.asarray, params)
    return np.concatenate([np.asarray(enc(p, jnp.asarray(rows[i:i + batch])))
                           for i in range(0, len(rows), batch)])


def logit_effects(model, direction: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(top-k promoted token ids, top-k suppressed) of a residual direction [D]."""
    norm = np.asarray(model.final_norm.weight[...], np.float32)
    scale = 1.0 + norm if model.config.norm_zero_centered else norm
    effect = (direction * scale) @ np.asarray(model.head_kernel(), np.float32)
    order = np.argsort(effect)
    return order[::-1][:k], order[:k], effect


def token_text(tokenizer, t: int) -> str:
    return tokenizer.decode([int(t)]) or f"<{int(t)}>"


def context_html(tokenizer, ids: np.ndarray, acts: np.ndarray, center: int, top: float) -> str:
    parts = []
    for j, (t, a) in enumerate(zip(ids, acts)):
        alpha = 0.0 if top <= 0 else min(float(a) / top, 1.0)
        cls = ' class="top"' if j == center else ""
        parts.append(f'<span{cls} style="background:rgba(255,120,0,{alpha:.2f})" '
                     f'title="{float(a):.3f}">{html.escape(token_text(tokenizer, t))}</span>')
    return '<div class="ctx">' + "".join(parts) + "</div>"


def analyze_run(run_dir: str | Path, out: str | Path | None = None, *,
                overwrite: bool = False) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "sae" / "cfg.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished SAE run (config.yaml and sae/ expected)")
    exp = sae_experiment_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    out = Path(out or run_dir / "dashboard")
    from qwenjax.atomic import check_output

    check_output(out, "sae-dashboard", overwrite=overwrite, inputs=[run_dir / "sae"])
    cfg, params, _ = read_sae(run_dir / "sae")
    model, tokenizer, key = load_model(exp)
    ids, rows = [], []
    for batch, acts in A.capture_batches(model, key, token_stream(exp, tokenizer), exp.eval_tokens):
        ids.append(batch["input_ids"])
        rows.append(acts)
    ids, rows = np.concatenate(ids), np.concatenate(rows)
    z = latent_stats(cfg, params, rows)  # [N,F]
    T = ids.shape[1]
    freq = (z > 0).mean(axis=0)
    chosen = [int(f) for f in np.argsort(-freq)[: exp.analyze_latents] if freq[f] > 0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with output_dir(out, "sae-dashboard", overwrite=overwrite, inputs=[run_dir / "sae"]) as tmp:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(np.log10(freq[freq > 0]), bins=40)
        ax.set(xlabel="log10 firing frequency", ylabel="latents",
               title=f"{exp.site}: {int((freq == 0).sum())} of {cfg.width} never fire")
        fig.tight_layout()
        fig.savefig(tmp / "frequencies.png", dpi=90)
        plt.close(fig)
        index_rows = []
        for f in chosen:
            index_rows.append(_latent_page(tmp, f, z[:, f], ids, T, exp, tokenizer, model,
                                           params, freq[f], plt))
        (tmp / "index.html").write_text(
            f"<html><head><meta charset='utf-8'><style>{STYLE}</style>"
            f"<title>SAE {exp.site}</title></head><body><h1>SAE on {html.escape(exp.site)}</h1>"
            f"<p>{cfg.architecture}, {cfg.width} latents, {len(rows)} held-out tokens of "
            f"{html.escape(exp.model.path)}.</p><img src='frequencies.png'>"
            "<table><tr><th>latent</th><th>frequency</th><th>max</th><th>top token</th>"
            "<th>promotes</th></tr>" + "".join(index_rows) + "</table></body></html>")
        summary = {"out": str(out), "latents": chosen, "tokens": len(rows),
                   "never_fire": int((freq == 0).sum())}
        (tmp / "summary.json").write_text(json.dumps(summary))
    return summary


def _latent_page(tmp, f, acts, ids, T, exp, tokenizer, model, params, freq, plt) -> str:
    top = float(acts.max())
    order = np.argsort(-acts)[: exp.top_contexts]
    w = exp.context_window
    contexts = []
    for n in order:
        if acts[n] <= 0:
            break
        r, c = divmod(int(n), T)
        lo, hi = max(c - w, 0), min(c + w + 1, T)
        row_acts = acts[r * T + lo: r * T + hi]
        contexts.append(context_html(tokenizer, ids[r, lo:hi], row_acts, c - lo, top))
    up, down, _ = logit_effects(model, np.asarray(params["W_dec"][f], np.float32))
    fmt = lambda ts: ", ".join(html.escape(repr(token_text(tokenizer, t))) for t in ts)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(acts[acts > 0], bins=40)
    ax.set(xlabel="activation", ylabel="tokens", title=f"latent {f}")
    fig.tight_layout()
    fig.savefig(tmp / f"latent_{f}.png", dpi=80)
    plt.close(fig)
    (tmp / f"latent_{f}.html").write_text(
        f"<html><head><meta charset='utf-8'><style>{STYLE}</style><title>latent {f}</title>"
        f"</head><body><p><a href='index.html'>index</a></p><h1>Latent {f}</h1>"
        f"<p>fires on {100 * freq:.2f}% of tokens; max activation {top:.3f}</p>"
        f"<img src='latent_{f}.png'><h2>Logit effects</h2><p>promotes: {fmt(up)}</p>"
        f"<p>suppresses: {fmt(down)}</p><h2>Top contexts</h2>{''.join(contexts)}</body></html>")
    first = html.escape(repr(token_text(tokenizer, ids.reshape(-1)[int(order[0])])))
    return (f"<tr><td><a href='latent_{f}.html'>{f}</a></td><td>{100 * freq:.2f}%</td>"
            f"<td>{top:.3f}</td><td>{first}</td><td>{fmt(up[:5])}</td></tr>")
