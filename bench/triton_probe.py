"""The 'unpack' GEMV of stream_probe.py written directly in Triton (through torch): its time and the
PTX instruction mix of its loop, to tell Triton's code generation apart from the Pallas lowering."""
import collections
import re

import torch
import triton
import triton.language as tl


@triton.jit
def gemv_unpack(x_ptr, w_ptr, o_ptr, KH: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr, STEPS: tl.constexpr,
                X2D: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BKH), tl.float32)
    for t in range(STEPS):
        c0 = split * STEPS * BKH + t * BKH
        cols = c0 + tl.arange(0, BKH)
        b = tl.load(w_ptr + rows[:, None] * KH + cols[None, :], eviction_policy="evict_first").to(tl.int32)
        lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        if X2D:  # x loaded straight into the weight tile's layout: a [BN, BKH] pointer, row stride 0
            xp = x_ptr + rows[:, None] * 0 + cols[None, :]
            acc += lo * tl.load(xp) + hi * tl.load(xp + KH)
        else:
            xl = tl.load(x_ptr + cols)
            xh = tl.load(x_ptr + KH + cols)
            acc += lo * xl[None, :] + hi * xh[None, :]
    tl.store(o_ptr + split * (tl.num_programs(0) * BN) + rows, tl.sum(acc, axis=1))


def main():
    n, kh = 14336, 2048
    copies = 16
    ws = [torch.randint(0, 256, (n, kh), dtype=torch.uint8, device="cuda") for _ in range(copies)]
    x = torch.randn(2, kh, device="cuda")
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    ms = triton.testing.do_bench(lambda: a.clone(), rep=200)
    bw = 2 * a.numel() / (ms * 1e-3)
    print(f"copy {bw / 1e12:.2f} TB/s")
    for x2d, bn, bkh, split, warps in [(0, 8, 256, 1, 4), (1, 8, 256, 1, 4), (1, 8, 512, 1, 4), (1, 16, 256, 2, 4),
                                       (1, 32, 512, 1, 4), (1, 32, 512, 2, 4), (1, 64, 512, 2, 4), (1, 32, 256, 2, 2),
                                       (1, 16, 512, 1, 2), (1, 64, 256, 1, 8)]:
        steps = kh // (bkh * split)
        out = torch.empty(split * n, device="cuda")
        grid = (n // bn, split)

        def call():
            for w in ws:
                gemv_unpack[grid](x, w, out, kh, bn, bkh, steps, x2d, num_warps=warps)

        ms = triton.testing.do_bench(call, rep=200) / copies
        print(f"triton unpack x2d={x2d} bn={bn} bkh={bkh} split={split} warps={warps}: {ms * 1e3:.1f} us {n * kh / (ms * 1e-3) / bw:.1%}")
        ref = (x[0] * (ws[0] & 15).float() + x[1] * (ws[0] >> 4).float()).sum(1)
        call()
        got = out.view(split, n).sum(0)
        assert torch.allclose(got, (x[0] * (ws[-1] & 15).float() + x[1] * (ws[-1] >> 4).float()).sum(1), rtol=1e-3, atol=1e-2)
    k = gemv_unpack.warmup(x, ws[0], out, kh, 32, 512, kh // 512, 1, num_warps=4, grid=(n // 32, 1))
    ptx = k.asm["ptx"]
    ops = collections.Counter(re.findall(r"^\s+([a-z]+[\.a-z0-9]*)", ptx, re.M))
    print("PTX op mix:", ", ".join(f"{o}:{c}" for o, c in ops.most_common(25)))
    import os
    open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv.ptx"), "w").write(ptx)


main()
