"""The top floor: `surogate train` and its parts, an application built on the compiler library.

Config, data, tokenizer, the training loop, checkpoints, several processes (DDP/FSDP2), CUDA graphs,
adapters and the `surogate` console script live here. This package may import every floor below it
(`surogate.compile`, `surogate.recipes`, `surogate.kernels`, ...); nothing below imports it, so the
compiler stays usable, and testable, without the trainer.
"""
