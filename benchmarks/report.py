#!/usr/bin/env python
"""The README's performance section and the plots under docs/, generated from benchmarks/results/*.csv,
so that no figure in the README is typed by hand.

    .venv/bin/python benchmarks/report.py                      # README.md between the bench markers, docs/bench_*.png
    .venv/bin/python benchmarks/report.py --results DIR --readme OUT.md --figures DIR   # anywhere else

For every (op, provider, mode, shape, dtype, device) the latest row is used; each table says when and
where its rows were taken, with how many threads and the load of the machine at the time.
"""
import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DEFAULT_RESULTS, read_rows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PROVIDER_ALIASES = {"torch eager": "eager", "torch.compile": "compile"}


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def kv(extra):
    """'a=1;b=2' -> {'a': '1', 'b': '2'} (other text is ignored)."""
    return dict(p.split("=", 1) for p in (extra or "").split(";") if "=" in p)


def latest(rows):
    """The latest row of every (op, provider, mode, shape, dtype, device), in first-seen order."""
    out = collections.OrderedDict()
    for r in sorted(rows, key=lambda r: r.get("date", "")):
        r = dict(r, provider=PROVIDER_ALIASES.get(r["provider"], r["provider"]),
                 dtype=r["dtype"].replace("torch.", ""))
        out[(r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], r["device"])] = r
    return list(out.values())


def provenance(rows):
    """One line saying when, where and under what load the rows were taken (from the rows alone)."""
    dates = sorted({r["date"][:16].replace("T", " ") for r in rows if r.get("date")})
    hosts = sorted({r["host"] for r in rows if r.get("host")})
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    loads = [num(r.get("load1")) for r in rows if num(r.get("load1")) is not None]
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "date unknown"
    line = f"_Rows of {when} UTC on {', '.join(hosts) or 'an unknown host'}"
    line += f", {'/'.join(threads)} thread(s)" if threads else ", threads not recorded"
    cpus = sorted({int(num(r.get("cpus"))) for r in rows if num(r.get("cpus"))})
    if loads:
        busy = bool(cpus) and max(loads) > 0.75 * min(cpus)
        span = f"{min(loads):.1f}" if min(loads) == max(loads) else f"{min(loads):.1f}-{max(loads):.1f}"
        line += (f", load average {span} on {'/'.join(map(str, cpus)) or 'an unrecorded number of'} CPUs when taken"
                 + (" (**a loaded machine: the times, and even the ratios, are noisy**)"
                    if busy else ""))
    else:
        line += ", machine load not recorded"
    versions = sorted({f"torch {r['torch']}" for r in rows if r.get("torch")})
    return line + (f"; {', '.join(versions)}" if versions else "") + "._"


def table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def ms(r):
    v = num(r.get("median_ms")) if r else None
    return "" if v is None else (f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms")


def x(v):
    return "" if v is None else f"{v:.2f}x"


# ---------------------------------------------------------------------------------------------- sections
def kernels(res):
    rows = latest(read_rows("gumbel_softmax", res) + read_rows("logit_laplace", res))
    if not rows:
        return None, []
    by = collections.defaultdict(dict)
    for r in rows:
        by[(r["op"], r["shape"], r["dtype"], r["mode"])][r["provider"]] = r
    body = []
    for (op, shape, dtype, mode), p in by.items():
        base = num((p.get("eager") or {}).get("median_ms"))
        cells = []
        for prov in ("eager", "compile", "dalle_fast"):
            r = p.get(prov)
            t = num(r["median_ms"]) if r else None
            cells.append(f"{ms(r)} ({x(base / t)})" if t and base else ms(r))
        ours = p.get("dalle_fast") or {}
        ceiling = re.search(r"([\d.]+) ?GB/s", ours.get("extra", ""))
        gbps = num(ours.get("gbps"))
        roof = f"{gbps:.1f} GB/s = {100 * gbps / float(ceiling.group(1)):.0f}% of {ceiling.group(1)}" \
            if gbps and ceiling else ""
        body.append([op, shape, dtype, mode, *cells, roof])
    text = table(["op", "shape", "dtype", "mode", "eager", "torch.compile", "dalle_fast", "dalle_fast vs copy ceiling"],
                 body)
    return text, rows


def attention(res):
    rows = [r for r in latest(read_rows("sparse_attention", res)) if r["op"] != "sparse_attention_seq"]
    train = [r for r in rows if r["op"] == "sparse_attention"]
    if not train:
        return None, None, []
    by = collections.defaultdict(dict)
    for r in train:
        by[(r["shape"], r["dtype"])][(r["provider"], r["mode"])] = r
    body, goals = [], []
    for (shape, dtype), p in by.items():
        if ("dalle_fast", "fwd+bwd") not in p:
            continue
        kind = shape.split()[0]
        ours = {m: p.get(("dalle_fast", m)) for m in ("fwd", "bwd", "fwd+bwd")}
        ideal = num(kv(ours["fwd+bwd"]["extra"]).get("ideal"))
        ratio = {m: num(r["ratio"]) if r else None for m, r in ours.items()}
        share = ratio["fwd+bwd"] / ideal if ideal and ratio["fwd+bwd"] else None
        flex = num((p.get(("flex", "fwd")) or {}).get("median_ms"))
        comp = num((p.get(("compile", "fwd+bwd")) or {}).get("median_ms"))
        t_fwd, t_full = num(ours["fwd"]["median_ms"]), num(ours["fwd+bwd"]["median_ms"])
        body.append([kind, dtype, x(ratio["fwd"]), x(ratio["bwd"]), x(ratio["fwd+bwd"]), x(ideal),
                     f"{100 * share:.0f}%" if share else "", ms(p.get(("dense", "fwd+bwd"))), ms(ours["fwd+bwd"]),
                     x(flex / t_fwd) if flex else "n/a", x(comp / t_full) if comp else "n/a"])
        if kind in ("row", "column") and share:
            goals.append(share >= 0.6 and (flex is None or flex > t_fwd))
    text = table(["kind", "dtype", "fwd", "bwd", "fwd+bwd", "ideal (1/density)", "fwd+bwd share of ideal",
                  "dense SDPA fwd+bwd", "dalle_fast fwd+bwd", "fwd vs compiled FlexAttention",
                  "fwd+bwd vs compiled reference"], body)
    if goals:
        text += ("\n\nIssue 3's CPU goal (row and column fwd+bwd >= 60% of the ideal speedup over dense, forward "
                 f"faster than FlexAttention): **{'met' if all(goals) else 'not met'}** in these rows.")
    dec = [r for r in rows if r["op"] == "sparse_attention_decode" and r["provider"] == "dalle_fast"]
    dbody = []
    for r in dec:
        e = kv(r["extra"])
        dbody.append([r["shape"].split()[0], r["dtype"], r["shape"].split()[1].split("=")[1], e.get("keys", ""),
                      x(num(r["ratio"])), e.get("ideal", ""), e.get("pct_of_ideal", ""), ms(r)])
    dtext = table(["kind", "dtype", "position", "keys read", "vs full-attention cached step", "ideal",
                   "share of ideal", "dalle_fast step"], dbody) if dbody else None
    return text, dtext, rows


def attention_seq(res):
    rows = [r for r in latest(read_rows("sparse_attention", res)) if r["op"] == "sparse_attention_seq"]
    return rows


def generation(res):
    rows = latest(read_rows("generate", res))
    if not rows:
        return None, []
    order = ["dalle_fast", "dalle_fast_bf16", "full_attention_fused", "full_kv_cache", "no_cache",
             "dalle_pytorch_cache", "dalle_pytorch_cache_bf16", "dalle_pytorch"]
    by = collections.defaultdict(dict)
    for r in rows:
        by[(r["device"], r["shape"])][r["provider"]] = r
    body = []
    for (device, shape), p in by.items():
        cells = []
        for prov in order:
            r = p.get(prov)
            m = re.search(r"([\d.]+) image tok/s", r["extra"]) if r else None
            cells.append(f"{float(m.group(1)):.0f} ({x(num(r['ratio']))})" if m else "")
        body.append([shape, device, *cells])
    text = table(["config, batch, sequence", "device", *order], body)
    return text, rows


def tok_s(r):
    m = re.search(r"([\d.]+) (?:image )?tok/s", r.get("extra", ""))
    return float(m.group(1)) if m else None


def training(res):
    out = []
    rows = latest(read_rows("dalle_train", res))
    if rows:
        body = [[r["shape"], r["provider"], r["mode"], ms(r), f"{tok_s(r):.0f}" if tok_s(r) else "", x(num(r["ratio"]))]
                for r in rows if r["mode"] == "fwd+bwd"]
        out.append(("Transformer training step, the paper's schedule, against our own dense and Flex paths "
                    "(`benchmarks/bench_dalle_train.py`)",
                    table(["shape", "provider", "mode", "time", "tokens/s", "vs dense"], body), rows))
    rows = latest(read_rows("peer_train", res))
    if rows:
        by = collections.defaultdict(dict)
        for r in rows:
            if r["mode"] == "fwd+bwd":
                kind, shape = r["shape"].split(" ", 1) if r["op"] == "train_step_transformer" else ("dVAE", r["shape"])
                by[(r["op"], kind, shape)][r["provider"]] = r
        body = []
        for (op, kind, shape), p in by.items():
            ours, peer = p.get("dalle_fast"), p.get("dalle_pytorch")
            params = lambda r: re.search(r"([\d.]+M) params", r["extra"]).group(1) if r else ""  # noqa: E731
            rate = (lambda r: f"{tok_s(r):.0f} tok/s" if tok_s(r) else "") if op == "train_step_transformer" else \
                (lambda r: re.search(r"[\d.]+ img/s", r["extra"]).group(0) if r else "")
            body.append([kind, shape, f"{ms(ours)}, {rate(ours)}, {params(ours)}" if ours else "",
                         f"{ms(peer)}, {rate(peer)}, {params(peer)}" if peer else "not installed",
                         x(num(ours["ratio"])) if ours and peer else ""])
        out.append(("Training steps against dalle-pytorch 1.6.6 at matched sizes, fwd+bwd "
                    "(`benchmarks/bench_peer_train.py`; ours: the same mask with our kernels, conv with its kernel 5)",
                    table(["dalle-pytorch attention", "shape", "dalle_fast", "dalle-pytorch", "speedup"], body), rows))
    rows = latest(read_rows("dvae_train", res))
    if rows:
        body = [[r["dtype"], r["provider"], r["mode"], ms(r), r["extra"].split(";")[0], x(num(r["ratio"]))]
                for r in rows if r["mode"] in ("fwd+bwd", "step")]
        out.append(("dVAE training step, fused Gumbel-softmax + logit-Laplace loss against the eager ops "
                    "(`benchmarks/bench_dvae_train.py`)",
                    table(["precision", "provider", "mode", "time", "rate", "vs eager"], body), rows))
    return out


def share(res):
    rows = latest(read_rows("attention_share", res))
    if not rows:
        return None, []
    by = collections.defaultdict(dict)
    for r in rows:
        by[r["shape"]][r["provider"]] = r
    body = []
    for shape, p in by.items():
        if not all(k in p for k in ("step_dense", "step_fused", "attn_dense", "attn_fused")):
            continue
        e = kv(p["step_dense"]["extra"])
        s, sav = num(e.get("share")), num(e.get("saving_bound"))
        body.append([shape, ms(p["step_dense"]), f"{ms(p['step_fused'])} ({x(num(p['step_fused']['ratio']))})",
                     f"{100 * s:.0f}%", x(num(p["attn_fused"]["ratio"])), x(1 / (1 - sav)) if sav is not None else "",
                     x(1 / (1 - s)) if s is not None and s < 1 else ""])
    text = table(["model", "step, dense attention", "step, dalle_fast", "attention share of the dense step",
                  "attention kernels alone", "most the kernels can give end to end", "bound for any attention"],
                 body)
    return text, rows


def gpu_static(res):
    import csv
    path = os.path.join(res, "gpu_static.csv")
    if not os.path.exists(path):
        return None, []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups = collections.OrderedDict()
    for r in rows:
        base = r["kernel"].split("<")[0]
        g = groups.setdefault((base, r["arch"]), {"n": 0, "regs": [], "spills": 0, "smem": [], "mma": 0, "local": 0,
                                                  "sass": False})
        g["n"] += 1
        g["regs"] += [int(r["registers"])] if r["registers"] else []
        g["spills"] += int(r["spill_stores"] or 0) + int(r["spill_loads"] or 0)
        g["smem"] += [int(r["smem_bytes"])] if r["smem_bytes"] else []
        g["mma"] += int(r["hmma"] or 0) + int(r["hgmma"] or 0)
        g["local"] += int(r["local_mem_ops"] or 0)
        g["sass"] |= bool(r["instructions"])
    body = []
    for (base, arch), g in sorted(groups.items()):
        rng = lambda v: "" if not v else (str(v[0]) if min(v) == max(v) else f"{min(v)}-{max(v)}")  # noqa: E731
        body.append([base, arch, g["n"], rng(g["regs"]), g["spills"], rng(g["smem"]),
                     g["mma"] if g["sass"] else "no SASS read", g["local"] if g["sass"] else ""])
    text = table(["kernel", "arch", "instances", "registers", "spill bytes", "static smem bytes",
                  "tensor-core instructions (HMMA+HGMMA)", "local-memory instructions (LDL/STL)"], body)
    dates = sorted({r["date"][:16].replace("T", " ") for r in rows})
    text += (f"\n\n_Read on {', '.join(sorted({r['host'] for r in rows}))} at {dates[-1]} UTC from the ptxas -v "
             "report of a full build (build/build.log) and the SASS of the built library (cuobjdump); dynamic "
             "shared memory is sized at launch and is not in the report._") if dates else ""
    return text, rows


# ---------------------------------------------------------------------------------------------- plots
def plots(res, figdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(figdir, exist_ok=True)
    made = []
    # speedup bars per op (fwd+bwd over the eager / dense baseline)
    bars = []
    for r in latest(read_rows("gumbel_softmax", res) + read_rows("logit_laplace", res)):
        if r["provider"] in ("compile", "dalle_fast") and r["mode"] in ("fwd+bwd",) or (
                r["op"] == "one_hot_argmax" and r["provider"] == "dalle_fast"):
            bars.append((f"{r['op']}\n{r['dtype']} {r['mode']}", r["provider"], num(r["ratio"])))
    for r in latest(read_rows("sparse_attention", res)):
        if r["op"] == "sparse_attention" and r["mode"] == "fwd+bwd" and r["provider"] in ("compile", "dalle_fast"):
            bars.append((f"attention {r['shape'].split()[0]}\n{r['dtype']} fwd+bwd", r["provider"], num(r["ratio"])))
    if bars:
        labels = list(dict.fromkeys(b[0] for b in bars))
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4))
        for i, prov in enumerate(("compile", "dalle_fast")):
            vals = {b[0]: b[2] for b in bars if b[1] == prov and b[2]}
            ax.bar([j + 0.4 * i for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], 0.4,
                   label="torch.compile" if prov == "compile" else "dalle_fast")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks([j + 0.2 for j in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("speedup over eager / dense SDPA")
        ax.set_title("Kernels, CPU (benchmarks/results)")
        ax.legend()
        fig.tight_layout()
        made.append(_save(fig, figdir, "bench_kernels.png"))
    # tokens/s against batch size
    gen = latest(read_rows("generate", res))
    if gen:
        configs = list(dict.fromkeys((r["shape"].split()[0], r["device"]) for r in gen))
        fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.8), squeeze=False)
        for ax, (cfg, device) in zip(axes[0], configs):
            series = collections.defaultdict(list)
            for r in gen:
                if r["shape"].split()[0] == cfg and r["device"] == device and tok_s(r):
                    series[r["provider"]].append((int(r["shape"].split("B=")[1].split()[0]), tok_s(r)))
            for prov, pts in series.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("image tokens/s")
            ax.set_title(f"{cfg} ({device})", fontsize=9)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        made.append(_save(fig, figdir, "bench_generate.png"))
    # attention speedup against sequence length; attention share against width
    seq = attention_seq(res)
    sh = latest(read_rows("attention_share", res))
    if seq or sh:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        series = collections.defaultdict(list)
        for r in seq:
            if r["provider"] == "dalle_fast":
                n = int(re.search(r"N(\d+)", r["shape"]).group(1))
                series[(r["shape"].split()[0], r["dtype"], r["mode"])].append((n, num(r["ratio"])))
        for (kind, dtype, mode), pts in series.items():
            pts.sort()
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{kind} {dtype} {mode}")
        axes[0].axhline(1, color="k", lw=0.8)
        axes[0].set_xlabel("sequence length (text + image tokens)")
        axes[0].set_ylabel("speedup over dense masked SDPA")
        axes[0].set_title("block-sparse attention vs sequence length", fontsize=9)
        if series:
            axes[0].legend(fontsize=7)
        pts = []
        for r in sh:
            if r["provider"] == "step_dense":
                pts.append((int(r["shape"].split("dim=")[1].split()[0]), 100 * num(kv(r["extra"])["share"]),
                            100 * num(kv(r["extra"])["saving_bound"])))
        pts.sort()
        if pts:
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="attention share of a dense step")
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="what the sparse kernels save")
            axes[1].set_xscale("log", base=2)
            axes[1].set_xlabel("model width (dim; heads = dim / 64)")
            axes[1].set_ylabel("% of a training step")
            axes[1].set_title("attention's share of a training step", fontsize=9)
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        made.append(_save(fig, figdir, "bench_attention.png"))
    return made


def _save(fig, figdir, name):
    import matplotlib.pyplot as plt
    path = os.path.join(figdir, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- section
FIGURES = ("bench_kernels.png", "bench_generate.png", "bench_attention.png")


def section(res, figdir, readme_dir, draw=True):
    """The markdown between the markers; draws the plots first (draw=False: links the ones already there)."""
    rel = lambda p: os.path.relpath(p, readme_dir)  # noqa: E731
    made = plots(res, figdir) if draw else [os.path.join(figdir, f) for f in FIGURES
                                             if os.path.exists(os.path.join(figdir, f))]
    figs = {os.path.basename(p): rel(p) for p in made}
    parts = [BEGIN, "<!-- generated by benchmarks/report.py from benchmarks/results/*.csv: edit those, "
             "not this -->", "",
             "Every figure in this section comes from the CSV rows in `benchmarks/results/` (`make bench` reruns "
             "all of them and regenerates this section and the plots; `benchmarks/report.py` alone redraws from "
             "the rows). Ratios are measured within one run; compare them, not absolute times across runs.", ""]
    text, rows = kernels(res)
    if text:
        parts += ["### Kernels against eager, torch.compile and the measured ceiling",
                  "(`benchmarks/bench_gumbel_softmax.py`, `benchmarks/bench_logit_laplace.py`; x = eager time / "
                  "this time)", "", text, "", provenance(rows), ""]
        if "bench_kernels.png" in figs:
            parts += [f"![speedup per op]({figs['bench_kernels.png']})", ""]
    text, dtext, rows = attention(res)
    if text:
        parts += ["### Block-sparse attention against dense SDPA, FlexAttention and torch.compile",
                  "(`benchmarks/bench_sparse_attention.py`; x = dense masked SDPA time / this time; FlexAttention "
                  "has no backward on the CPU, so only its forward is compared)", "", text, ""]
        if dtext:
            parts += ["Cached decode (one query, only the allowed keys) against a full-attention cached step:", "",
                      dtext, ""]
        parts += [provenance(rows), ""]
        if "bench_attention.png" in figs:
            seq = attention_seq(res)
            parts += [f"![attention speedup against sequence length; attention share against width]"
                      f"({figs['bench_attention.png']})", ""]
            if seq:
                parts += ["Left: fwd+bwd against dense masked SDPA as the image grows "
                          "(`bench_sparse_attention.py --seq-only`). " + provenance(seq), ""]
    text, rows = generation(res)
    if text:
        parts += ["### Generation against dalle-pytorch's cached loop and generate_images",
                  "(`benchmarks/bench_generate.py`; image tokens/s of the token loop, the dVAE decode left out; "
                  "x = against dalle-pytorch 1.6.6's working cached loop `forward(..., cache=cache)`; its "
                  "`generate_images` ignores `use_cache` at cond_scale 1)", "", text, "", provenance(rows), ""]
        if "bench_generate.png" in figs:
            parts += [f"![tokens/s against batch size]({figs['bench_generate.png']})", ""]
    for title, text, rows in training(res):
        parts += [f"### {title}", "", text, "", provenance(rows), ""]
    text, rows = share(res)
    if text:
        parts += ["### How much of a training step attention is (`benchmarks/bench_attention_share.py`)", "",
                  "Batch 1, depth 2 (row, conv), the sequence length N in each row. The share is the dense "
                  "attention calls' fwd+bwd time over the whole dense step's; the end-to-end gain of any "
                  "attention kernel is bounded by 1 / (1 - share), and what ours can give by "
                  "1 / (1 - share * (1 - fused / dense attention time)). Attention's cost grows as N^2 * dim, "
                  "the MLPs', projections' and the 8192-way image head's as N * dim^2 and N * dim * 8192: at a "
                  "fixed N the share falls as the model widens and it rises with N at a fixed width (the rows "
                  "measure the widths; the plot of attention speedup against sequence length shows the kernels "
                  "alone).", "",
                  text, "", provenance(rows), ""]
    text, rows = gpu_static(res)
    if text:
        parts += ["### Static GPU evidence per CUDA kernel (`benchmarks/bench_gpu_static.py`)", "",
                  "No GPU has run these kernels; this is what the compiler reports about them.", "", text, ""]
    parts.append(END)
    return "\n".join(parts)


def replace_section(readme_text, new):
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError(f"README has no {BEGIN} ... {END} markers")
    a, b = readme_text.index(BEGIN), readme_text.index(END) + len(END)
    return readme_text[:a] + new + readme_text[b:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=DEFAULT_RESULTS)
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="a file with the markers (replaced between them), or a new file (the section alone)")
    p.add_argument("--figures", default=os.path.join(ROOT, "docs"))
    a = p.parse_args(argv)
    new = section(a.results, a.figures, os.path.dirname(os.path.abspath(a.readme)))
    if os.path.exists(a.readme) and BEGIN in open(a.readme).read():
        with open(a.readme) as f:
            out = replace_section(f.read(), new)
    else:
        out = new + "\n"
    tmp = a.readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(out)
    os.replace(tmp, a.readme)
    print(f"wrote {a.readme} ({new.count(chr(10))} lines of section) and plots under {a.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
