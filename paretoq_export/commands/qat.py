"""`paretoq-export qat`: ParetoQ quantization-aware training, then the canonical checkpoint.

Training options map one to one onto qat.trainer.TrainConfig in ``train_config``: a new trainer setting is one
argument below and one line there."""

from __future__ import annotations

import argparse

from paretoq_export.arguments import (
    add_checkpoint_arguments, add_data_arguments, add_model_arguments, add_quantization_arguments, data_config,
    qat_config, table_bits_given,
)

HELP = "ParetoQ quantization-aware training, then the canonical checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_quantization_arguments(parser)
    add_checkpoint_arguments(parser)
    add_data_arguments(parser, required=True)
    p = parser
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per device (blocks)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--recipe", default="default", choices=("default", "paper"),
                   help="default: least-squares alpha init, soft-to-hard annealing from the float weights, alpha lr "
                        "x10, distillation from the float model, a 4-bit (<=2 bits) / 8-bit embedding table, lr 1e-3 "
                        "(<=2 bits) / 5e-4 (3/4 bits per row) / 3e-5 (3/4 bits per group); paper: ParetoQ's own "
                        "(max-based alpha, quantized from step 0, no teacher, float table, lr 2e-5 / 1e-5). The "
                        "flags below override single settings")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--alpha-init", default=None, choices=("paper", "mse"),
                   help="per-row alpha start: the paper's max/mean-based one, or the least-squares fit")
    p.add_argument("--anneal-frac", type=float, default=None, metavar="F",
                   help="blend from float into quantized weights over this fraction of the steps (0: off)")
    p.add_argument("--alpha-lr-scale", type=float, default=None, help="the alphas' lr relative to the weights'")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of steps")
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out perplexity every N steps (default: about 8 evaluations a run; 0: only at the end)")
    p.add_argument("--keep-best", dest="keep_best", action="store_true", default=None,
                   help="end with the weights of the best held-out evaluation (default: on when there is held-out "
                        "data)")
    p.add_argument("--no-keep-best", dest="keep_best", action="store_false", help="end with the last step's weights")
    p.add_argument("--distill-topk", type=int, default=0, metavar="K",
                   help="distil only the teacher's top-K tokens per position (0: the full distribution)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels and reduction order: two identical runs give identical checkpoints "
                        "(slower on GPU)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--distill", type=float, default=None, metavar="W",
                   help="knowledge distillation from the float model: loss = (1-W)*CE + W*KL (0 = off; default: "
                        "the recipe's)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: DistributedDataParallel, or FSDP2 fully_shard (each rank holds its rows of "
                        "every weight and alpha; sharded resumable state)")
    p.add_argument("--fused", dest="fused", action="store_true", default=None,
                   help="one-pass fake-quant kernels (Triton on CUDA, torch.compile elsewhere); default on for CUDA")
    p.add_argument("--no-fused", dest="fused", action="store_false", help="the reference (unfused) fake-quant")
    p.add_argument("--state-dir", default=None, help="where training state is checkpointed (default: OUTPUT.train)")
    p.add_argument("--save-every", type=int, default=0, help="save resumable training state every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --state-dir")
    p.add_argument("--seed", type=int, default=0)


def chosen_recipe(args: argparse.Namespace):
    """The --recipe with any of its settings given explicitly on the command line put over it."""
    from qat.recipe import recipe

    return recipe(args.recipe, alpha_init=args.alpha_init, anneal_frac=args.anneal_frac,
                  alpha_lr_scale=args.alpha_lr_scale, distill_weight=args.distill)


def train_config(args: argparse.Namespace):
    """The one place that turns `qat` arguments into a qat.trainer.TrainConfig (before the recipe is applied)."""
    from qat.trainer import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20),
        eval_every=args.eval_every, eval_batches=args.eval_batches, seed=args.seed, keep_best=args.keep_best,
        distill_topk=args.distill_topk, deterministic=args.deterministic,
        gradient_checkpointing=args.gradient_checkpointing,
        parallel=args.parallel, fused=args.fused,
        output_dir=args.state_dir or f"{args.output.rstrip('/')}.train", save_every=args.save_every,
        resume=args.resume,
    )


def run(args: argparse.Namespace) -> int:
    if args.deterministic:  # cuBLAS reads it when CUDA starts: before any model or tensor reaches the GPU
        from qat.trainer import request_deterministic_cublas

        request_deterministic_cublas()
    from paretoq_export.pipeline import run_qat
    from qat.recipe import apply_recipe, with_recipe_table

    chosen = chosen_recipe(args)
    qcfg, tcfg = apply_recipe(chosen, qat_config(args), train_config(args))
    if not table_bits_given(args):
        qcfg = with_recipe_table(chosen, qcfg)
        if qcfg.embedding_bits is not None:
            print(f"recipe {chosen.name}: the embedding table at {qcfg.embedding_bits:g} bits (--embedding-bits "
                  "4|8|float chooses)")
    run = run_qat(args.model, qcfg, data_config(args), tcfg, args.output, args.overwrite,
                  args.float_dtype, args.trust_remote_code, recipe=chosen.to_json())
    if run.checkpoint:
        r = run.result
        ppl = ", ".join(f"step {s}: {p:.2f}" for s, p in r.heldout_ppl)
        print(f"trained {r.steps} steps in {run.seconds:.0f} s ({r.tokens_per_s:,.0f} tokens/s), "
              f"final loss {r.final_loss:.4f}; held-out PPL {ppl}")
        from qat.targets import recorded_stored_bits

        if recorded_stored_bits(run.checkpoint):
            print(recorded_stored_bits(run.checkpoint))
        print(f"wrote {run.checkpoint}")
    return 0
