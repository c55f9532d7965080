"""`TrainConfig`: how one task trains, with the per-method defaults. Imports nothing heavy, so the CLI builds
its flags from it without loading torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .errors import ErError

PRECISIONS = ("fp32", "bf16")

METHODS = ("full", "reduced", "lora")
LORA_MODULES = ("attention", "all")  # the family table's query/value Linears, or every Linear of the upper layers
LORA_VARIANTS = ("lora", "rslora", "dora")  # peft's LoRA, rank-stabilised scaling (alpha/sqrt(r)), weight-decomposed

# What each method gets for a field left None: the best mean dev of the bundled tasks' sweeps (benchmarks/REPORT.md,
# defaults-dev; tests/test_defaults.py checks that the two agree), as are the batch and epoch defaults below.
METHOD_DEFAULTS = {
    "full": {"lr": 1e-4, "min_steps": 0},
    "reduced": {"lr": 3e-4, "min_steps": 0},
    "lora": {"lr": 1e-3, "min_steps": 1000, "lora_modules": "all", "lora_r": 16, "lora_alpha": 32},
}
# No "head_lr" here: heads train at lr. lora's at 1e-2 lost a point of mean dev on MiniLM (REPORT defaults-dev).
DEFAULT_LR = {m: d["lr"] for m, d in METHOD_DEFAULTS.items()}
# The rates above were chosen on MiniLM (hidden size 384). On an encoder at least WIDE wide, a method listed here
# takes this rate instead: `reduced` at 3e-4 diverged on the 768-wide MPNet (NER dev F1 0.0 and 0.72 on two seeds,
# 0.75 at 1e-4; sci-cite dev 0.817 against 0.837 at 1e-4): REPORT, the MPNet note by fidelity-mpnet, and encoder-12.
# `full` at 1e-4 stalled at the majority label on MPNet sci-cite (dev 0.61; 0.847 at 5e-5), and NER dev preferred
# 5e-5 too (0.791 against 0.784), seed 0 of each.
WIDE = 768
WIDE_LR = {"full": 5e-5, "reduced": 1e-4}
# On MPNet, lora's head at lr (1e-3) never left NER's all-O plateau (dev F1 0.0 on three seeds, as did a linear probe
# on its frozen layers); at 1e-2, dev 0.798 / 0.783 / 0.760, and sci-cite dev 0.822 against 0.817 (seed means).
WIDE_HEAD_LR = {"lora": 1e-2}
_PER_METHOD = ("min_steps", "lora_modules", "lora_r", "lora_alpha")


def _wide(table: dict, method: str, hidden_size: int | None) -> float | None:
    return table.get(method) if hidden_size is not None and hidden_size >= WIDE else None


def default_lr(method: str, hidden_size: int | None = None) -> float:
    """The peak learning rate `method` trains at where none is given, on an encoder of this hidden size."""
    return _wide(WIDE_LR, method, hidden_size) or DEFAULT_LR[method]


def default_head_lr(method: str, hidden_size: int | None = None) -> float | None:
    """The task head's peak learning rate where none is given: None trains it at lr."""
    return _wide(WIDE_HEAD_LR, method, hidden_size) or METHOD_DEFAULTS[method].get("head_lr")


def _defaults(name: str) -> str:
    return "default per method: " + ", ".join(f"{m} {d[name]:g}" if not isinstance(d[name], str) else f"{m} {d[name]}"
                                              for m, d in METHOD_DEFAULTS.items() if name in d)


@dataclass
class TrainConfig:
    method: str = field(default="reduced", metadata={
        "choices": METHODS, "help": "reduced: fine-tune layers k..L from the cache; lora: peft adapters on layers k..L from the "
        "cache (LoRA, or the tuner of peft_config); full: the whole model from raw text (the baseline)"})
    epochs: int = field(default=4, metadata={"help": "maximum number of passes over train"})
    lr: float | None = field(default=None, metadata={"help": f"peak learning rate ({_defaults('lr')}; "
                             + ", ".join(f"{m} {v:g}" for m, v in WIDE_LR.items()) + f" on encoders of hidden size >= {WIDE})"})
    head_lr: float | None = field(default=None, metadata={
        "help": "peak learning rate of the task head (default: lr; "
        + ", ".join(f"{m} {v:g}" for m, v in WIDE_HEAD_LR.items()) + f" on encoders of hidden size >= {WIDE})"})
    min_steps: int | None = field(default=None, metadata={
        "help": "at least this many optimizer steps: a small task gets more epochs than --epochs, and early stopping on dev "
        f"still ends the run ({_defaults('min_steps')})"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step, split across the workers"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "share of steps with linear warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    patience: int = field(default=2, metadata={"help": "epochs without dev improvement before stopping"})
    seed: int = field(default=0, metadata={"help": "seed for init, dropout and shuffling: the same seed on the same cache repeats a run on CPU"})
    lora_modules: str | None = field(default=None, metadata={
        "choices": LORA_MODULES, "help": "LoRA on the attention's query and value Linears, or on every Linear of the upper "
        f"layers (attention and FFN) ({_defaults('lora_modules')})"})
    lora_r: int | None = field(default=None, metadata={"help": f"LoRA rank ({_defaults('lora_r')})"})
    lora_alpha: int | None = field(default=None, metadata={"help": f"LoRA scaling alpha ({_defaults('lora_alpha')})"})
    lora_variant: str = field(default="lora", metadata={
        "choices": LORA_VARIANTS, "help": "plain LoRA, rsLoRA (scaling alpha/sqrt(r)) or DoRA (magnitude and direction)"})
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
        for name in _PER_METHOD:  # a method without its own default (e.g. lora_r for reduced) takes lora's: unused there
            if getattr(self, name) is None:
                setattr(self, name, METHOD_DEFAULTS[self.method].get(name, METHOD_DEFAULTS["lora"][name]))
        if self.lora_modules not in LORA_MODULES or self.lora_variant not in LORA_VARIANTS:
            raise ErError(f"lora_modules {self.lora_modules!r} must be one of {LORA_MODULES} and lora_variant "
                          f"{self.lora_variant!r} one of {LORA_VARIANTS}")
        if self.min_steps < 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ErError(f"min_steps ({self.min_steps}) must be >= 0 and head_lr ({self.head_lr}) > 0")
        if self.precision not in PRECISIONS:
            raise ErError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if (self.lr is not None and self.lr <= 0) or self.lora_r < 1:
            raise ErError(f"lr ({self.lr}) must be > 0 and lora_r ({self.lora_r}) >= 1")
        if self.peft_config is not None:
            if self.method != "lora":
                raise ErError(f"a peft config trains adapters: use method lora (adapters, LoRA by default), not {self.method!r}")
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

            kind = str(self.peft_config.get("peft_type", "")).upper()
            if kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise ErError(f"peft config: peft_type {self.peft_config.get('peft_type')!r} is not one of "
                              f"{', '.join(sorted(map(str, PEFT_TYPE_TO_CONFIG_MAPPING)))}")

    def max_epochs(self, steps_per_epoch: int) -> int:
        """Epochs to run at most: `epochs`, or more where that would leave fewer than `min_steps` steps."""
        return max(self.epochs, -(-self.min_steps // max(1, steps_per_epoch)))

    def for_encoder(self, hidden_size: int) -> "TrainConfig":
        """This config with its rates settled: the ones given, else the method's defaults for an encoder this wide.
        Training settles them once the cache names the encoder; None until then means "the default"."""
        lr = default_lr(self.method, hidden_size) if self.lr is None else self.lr
        head_lr = default_head_lr(self.method, hidden_size) if self.head_lr is None else self.head_lr
        return replace(self, lr=lr, head_lr=head_lr)

    @property
    def source(self) -> str:
        return "text" if self.method == "full" else "cache"

    def to_dict(self) -> dict:
        return asdict(self)
