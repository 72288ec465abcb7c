"""Forward + backward time of the discriminators' convolutions at the HiFi-GAN V1 benchmark shape, each layer alone:
the MSD's in TF32, in fp32 without TF32 and in bf16; the MPD's (k, 1) convolutions two equivalent ways, as 2-D
convolutions over (B, C, T / p, p) (the papers' form) and as 1-D convolutions over (B * p, C, T / p) (the period
folded into the batch).

    python benchmarks/vocoder_convs.py [--batch 32] [--segment 8192] [--benchmark_limit 10] [--only msd|mpd]
"""

import argparse
import json

import torch
import torch.nn.functional as F


def timed(fn, repeat=30):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def fwd_bwd(conv, x, w, b, **kw):
    x = x.detach().requires_grad_(x.size(1) > 1)
    w = w.detach().requires_grad_(True)

    def run():
        y = conv(x, w, b, **kw)
        y.backward(torch.ones_like(y))
    return timed(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="The discriminators see real and generated: 2 x 16.")
    parser.add_argument("--segment", type=int, default=8192)
    parser.add_argument("--benchmark_limit", type=int, default=10,
                        help="cuDNN algorithms tried per convolution shape (0: all).")
    parser.add_argument("--only", default="", help="'msd' or 'mpd' to time one discriminator's layers.")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    torch.backends.cudnn.allow_tf32 = True
    dev, rows = "cuda", []
    widths = (1, 32, 128, 512, 1024, 1024)
    for p in (2, 3, 5, 7, 11) if args.only != "msd" else ():
        h = -(-args.segment // p)
        for i, (ci, co) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 3 if i < 4 else 1
            x4 = torch.randn(args.batch, ci, h, p, device=dev)
            w4 = torch.randn(co, ci, 5, 1, device=dev) * 0.01
            b = torch.zeros(co, device=dev)
            t2d = fwd_bwd(F.conv2d, x4, w4, b, stride=(stride, 1), padding=(2, 0))
            x1 = x4.permute(0, 3, 1, 2).reshape(args.batch * p, ci, h).contiguous()
            t1d = fwd_bwd(F.conv1d, x1, w4.squeeze(-1), b, stride=stride, padding=2)
            rows.append({"layer": f"mpd p{p} conv{i} {ci}->{co} H={h}", "conv2d_ms": round(t2d, 3),
                         "folded_conv1d_ms": round(t1d, 3)})
            h = (h + 2 * 2 - 5) // stride + 1
    msd = [(1, 128, 15, 1, 1), (128, 128, 41, 2, 4), (128, 256, 41, 2, 16), (256, 512, 41, 4, 16),
           (512, 1024, 41, 4, 16), (1024, 1024, 41, 1, 16), (1024, 1024, 5, 1, 1)]
    scales = (args.segment, args.segment // 2 + 1, args.segment // 4 + 1) if args.only != "mpd" else ()
    for scale, t0 in enumerate(scales):
        t = t0
        for i, (ci, co, k, s, g) in enumerate(msd):
            x = torch.randn(args.batch, ci, t, device=dev)
            w = torch.randn(co, ci // g, k, device=dev) * 0.01
            b = torch.zeros(co, device=dev)
            ms = fwd_bwd(F.conv1d, x, w, b, stride=s, padding=k // 2, groups=g)
            torch.backends.cudnn.allow_tf32 = False
            ms32 = fwd_bwd(F.conv1d, x, w, b, stride=s, padding=k // 2, groups=g)
            torch.backends.cudnn.allow_tf32 = True
            ms16 = fwd_bwd(F.conv1d, x.bfloat16(), w.bfloat16(), b.bfloat16(), stride=s, padding=k // 2, groups=g)
            rows.append({"layer": f"msd s{scale} conv{i} {ci}->{co} k{k} g{g} T={t}", "tf32_ms": round(ms, 3),
                         "fp32_ms": round(ms32, 3), "bf16_ms": round(ms16, 3)})
            t = (t + 2 * (k // 2) - k) // s + 1
    for r in rows:
        print(json.dumps(r))
    mpd2 = sum(r["conv2d_ms"] for r in rows if "conv2d_ms" in r)
    mpd1 = sum(r["folded_conv1d_ms"] for r in rows if "conv2d_ms" in r)
    msd = sum(r["tf32_ms"] for r in rows if "tf32_ms" in r)
    msd16 = sum(r["bf16_ms"] for r in rows if "bf16_ms" in r)
    print(json.dumps({"benchmark_limit": args.benchmark_limit, "mpd_conv2d_total_ms": round(mpd2, 2),
                      "mpd_folded_total_ms": round(mpd1, 2), "msd_total_ms": round(msd, 2),
                      "msd_bf16_total_ms": round(msd16, 2)}))


if __name__ == "__main__":
    main()
