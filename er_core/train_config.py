"""`TrainConfig`: how one task trains, with the per-method defaults. Imports nothing heavy, so the CLI builds
its flags from it without loading torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import ErError

PRECISIONS = ("fp32", "bf16")

METHODS = ("full", "reduced", "lora")
# The peak learning rate each method gets when none is given: the best mean dev of the bundled tasks' sweeps
# at batch 16 and 4 epochs (benchmarks/REPORT.md, defaults-dev), as are the batch and epoch defaults below.
DEFAULT_LR = {"full": 1e-4, "reduced": 3e-4, "lora": 3e-3}


@dataclass
class TrainConfig:
    method: str = field(default="reduced", metadata={
        "choices": METHODS, "help": "reduced: fine-tune layers k..L from the cache; lora: peft adapters on layers k..L from the "
        "cache (LoRA, or the tuner of peft_config); full: the whole model from raw text (the baseline)"})
    epochs: int = field(default=4, metadata={"help": "maximum number of passes over train"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default per method: " + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step, split across the workers"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "share of steps with linear warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    patience: int = field(default=2, metadata={"help": "epochs without dev improvement before stopping"})
    seed: int = field(default=0, metadata={"help": "seed for init, dropout and shuffling"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS, "help": "bf16: train under bf16 autocast (weights and optimizer stay fp32); for GPUs with bf16"})
    peft_config: dict | None = field(default=None, metadata={
        "help": "method lora: any peft tuner's config (a dict with peft_type: LORA, IA3, LOHA, ...; on the command line a "
        "JSON/YAML file or a folder holding peft's adapter_config.json); target modules left out come from the family table; "
        "None: LoRA of lora_*"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ErError(f"method {self.method!r} is not one of {METHODS}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ErError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be at least 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ErError(f"warmup_ratio {self.warmup_ratio} must be in [0, 1)")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.precision not in PRECISIONS:
            raise ErError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.lr <= 0 or self.lora_r < 1:
            raise ErError(f"lr ({self.lr}) must be > 0 and lora_r ({self.lora_r}) >= 1")
        if self.peft_config is not None:
            if self.method != "lora":
                raise ErError(f"a peft config trains adapters: use method lora (adapters, LoRA by default), not {self.method!r}")
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

            kind = str(self.peft_config.get("peft_type", "")).upper()
            if kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise ErError(f"peft config: peft_type {self.peft_config.get('peft_type')!r} is not one of "
                              f"{', '.join(sorted(map(str, PEFT_TYPE_TO_CONFIG_MAPPING)))}")

    @property
    def source(self) -> str:
        return "text" if self.method == "full" else "cache"

    def to_dict(self) -> dict:
        return asdict(self)
