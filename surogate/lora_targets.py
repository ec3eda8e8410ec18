"""The default LoRA target names, shared by `surogate.compile` and the config of `surogate train`: a module of
its own (no torch) so that checking a config imports neither torch nor the compiler (seconds; bitsandbytes with
it). Why these names: the comment in `surogate.compiler` beside COMPANION_TARGETS."""

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                   "gate_up_proj", "out_proj", "fc1", "fc2")
