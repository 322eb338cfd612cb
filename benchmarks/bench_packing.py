"""Packed-sequence ops against the plain PyTorch way, same run, same thread count.

    python benchmarks/bench_packing.py [--threads 1] [--seqs 256] [--min-len 100] [--max-len 4000] [--k 32]

Rows (median of --repeats after --warmup, milliseconds; ratio = torch / opdcore, > 1 means opdcore is faster):
  pad    packed [N, ...] -> padded [B, T, ...]: opdcore.to_padded vs pad_sequence(packed.split(lengths))
  unpad  padded -> packed: opdcore.from_padded vs padded[mask] with a precomputed boolean mask
  pack   PackedBuffer.pack (ids, positions, cu_seqlens, loss mask, 2 top-k payloads) vs torch.cat of the
         per-sequence pieces (opdcore.reference.pack_sequences)
  split  split_micro_batches vs the Python heapq twin (opdcore.reference.split_micro_batches)
floor: torch.empty(output).fill_(0), the cost of writing a freshly allocated output of the same size. Outputs over
glibc's mmap threshold (32 MiB) come back as fresh pages on every call, so page faults, not the copy, dominate
both columns there.
"""
import argparse
import os
import statistics
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=4000)
    p.add_argument("--prompt-frac", type=float, default=0.25, help="share of each sequence that is prompt")
    p.add_argument("--k", type=int, default=32, help="top-k width of the payloads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


args = parse()
# Before torch loads: torch and opdcore share one OpenMP runtime, so this fixes both.
os.environ["OMP_NUM_THREADS"] = str(args.threads)

import torch  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402

import opdcore  # noqa: E402
from opdcore import reference as ref  # noqa: E402

torch.set_num_threads(args.threads)


def median_ms(fn):
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    g = torch.Generator().manual_seed(args.seed)
    B = args.seqs
    lengths = torch.randint(args.min_len, args.max_len + 1, (B,), generator=g)
    plens = (lengths.double() * args.prompt_frac).long().clamp(min=1, max=None)
    plens = torch.minimum(plens, lengths - 1)
    rlens = lengths - plens
    N, T = int(lengths.sum()), int(lengths.max())
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    len_list = lengths.tolist()
    mask = torch.arange(T)[None, :] < lengths[:, None]

    rows = []

    def row(op, what, ours, theirs, check, outputs=()):
        t_o, t_t = median_ms(ours), median_ms(theirs)
        check()
        floor = median_ms(lambda: [torch.empty(shape, dtype=dt).fill_(0) for shape, dt in outputs]) if outputs else None
        rows.append((op, what, t_o, t_t, t_t / t_o, floor))

    # pad / unpad over a token-id stream and a top-k log-prob payload.
    for name, x, pad in [("ids int64 [N]", torch.randint(0, 150000, (N,), generator=g), -100),
                         (f"logprobs f32 [N,{args.k}]", torch.randn(N, args.k, generator=g), 0.0),
                         (f"logprobs bf16 [N,{args.k}]", torch.randn(N, args.k, generator=g).bfloat16(), 0.0)]:
        def check_pad(x=x, pad=pad):
            assert torch.equal(opdcore.to_padded(x, cu, T, pad), pad_sequence(list(x.split(len_list)), True, pad))
        row("pad", name, lambda x=x, pad=pad: opdcore.to_padded(x, cu, T, pad),
            lambda x=x, pad=pad: pad_sequence(list(x.split(len_list)), batch_first=True, padding_value=pad), check_pad,
            [((B, T, *x.shape[1:]), x.dtype)])
        padded = opdcore.to_padded(x, cu, T, pad)

        def check_unpad(padded=padded, x=x):
            assert torch.equal(opdcore.from_padded(padded, cu), x) and torch.equal(padded[mask], x)
        row("unpad", name, lambda padded=padded: opdcore.from_padded(padded, cu), lambda padded=padded: padded[mask],
            check_unpad, [(x.shape, x.dtype)])

    # pack: prompt/response ids plus two per-response-token payloads (teacher top-k ids and log-probs).
    prompts = [torch.randint(0, 150000, (int(p),), generator=g) for p in plens]
    responses = [torch.randint(0, 150000, (int(r),), generator=g) for r in rlens]
    payloads = [{"teacher_ids": torch.randint(0, 150000, (int(r), args.k), generator=g),
                 "teacher_logprobs": torch.randn(int(r), args.k, generator=g)} for r in rlens]
    buf = opdcore.PackedBuffer()
    t0 = time.perf_counter()
    for p, r, d in zip(prompts, responses, payloads):
        buf.add(p, r, d)
    add_ms = (time.perf_counter() - t0) * 1e3

    def check_pack():
        got, want = buf.pack(), ref.pack_sequences(prompts, responses, payloads)
        assert torch.equal(got.input_ids, want["input_ids"]) and torch.equal(got.loss_mask, want["loss_mask"])
        assert all(torch.equal(got.payloads[n], want["payloads"][n]) for n in want["payloads"])
    row("pack", f"ids + 2 payloads [N,{args.k}]", buf.pack, lambda: ref.pack_sequences(prompts, responses, payloads),
        check_pack, [((N,), torch.int64)] * 2 + [((N,), torch.bool), ((N, args.k), torch.int64),
                                                  ((N, args.k), torch.float32)])

    budget = 4 * args.max_len

    def check_split():
        assert opdcore.split_micro_batches(len_list, budget) == ref.split_micro_batches(len_list, budget)
    row("split", f"max_tokens={budget}", lambda: opdcore.split_micro_batches(len_list, budget),
        lambda: ref.split_micro_batches(len_list, budget), check_split)

    print(f"# opdcore {opdcore.__version__}, torch {torch.__version__}, threads={args.threads}, B={B}, "
          f"lengths U[{args.min_len}, {args.max_len}] -> N={N}, T={T}; median of {args.repeats} (warm-up {args.warmup})")
    print(f"# PackedBuffer.add x{B} (one-off, copies into the buffer): {add_ms:.1f} ms")
    print(f"| {'op':<6} | {'data':<26} | {'opdcore ms':>10} | {'torch ms':>9} | {'torch/opdcore':>13} | {'floor ms':>8} |")
    print(f"|{'-' * 8}|{'-' * 28}|{'-' * 12}|{'-' * 11}|{'-' * 15}|{'-' * 10}|")
    for op, what, a, b, r, f in rows:
        fl = f"{f:>8.2f}" if f is not None else f"{'-':>8}"
        print(f"| {op:<6} | {what:<26} | {a:>10.2f} | {b:>9.2f} | {r:>12.2f}x | {fl} |")


if __name__ == "__main__":
    main()
