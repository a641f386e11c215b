"""Configuration of one MoE layer: the router's settings and the layer's.

Field names follow Megatron-Core's `--moe-*` flags and DeepSpeed's `MoE(...)` arguments so that a
user of either recognises them. Every field is validated in `__post_init__`; errors name the field,
the value and the allowed values.

Example:
    >>> cfg = MoEConfig(hidden_size=64, num_experts=8, ffn_hidden_size=128,
    ...                 router=RouterConfig(top_k=2, capacity_factor=1.25))
    >>> cfg.router.top_k
    2
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from moeflow.utils.validate import check_choice, check_non_negative

ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "relu")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
AUX_LOSS_TYPES = ("none", "aux_loss", "seq_aux_loss", "global_aux_loss")
ROUTER_DTYPES = ("fp32", "fp64")


@dataclass(kw_only=True, frozen=True)
class RouterConfig:
    """How tokens choose experts, and what the balancing losses are.

    Semantics (docs/methods.md, "Top-k routing"):

    - `score_function="softmax"`, `pre_softmax=False` (Megatron's default): top-k over the logits,
      then a softmax over the k selected logits, so the k weights always sum to 1.
    - `score_function="softmax"`, `pre_softmax=True`: softmax over all experts, then top-k of the
      probabilities; `normalize_topk=True` rescales them to sum to 1 (DeepSpeed's `topkgating`).
    - `score_function="sigmoid"`: per-expert sigmoid scores; `normalize_topk=True` divides the k
      selected scores by their sum (Megatron does this only when k > 1).
    - `normalize_topk` applies for every k, as in DeepSpeed: with k=1 it makes every weight 1, so
      the router learns only through the balancing loss. Switch-style k=1 routing wants
      `pre_softmax=True, normalize_topk=False` (the weight is then the expert's probability).
    - `capacity_factor=None` is dropless (the default). Otherwise each expert takes at most `C =
      max(ceil(T*k/E * capacity_factor), min_capacity)` (token, slot) pairs; `min_capacity=0`
      reproduces Megatron, DeepSpeed's default is 4.
    - Weights are **not** renormalised after a drop: a dropped slot contributes zero and the
      surviving slots keep their weight (Megatron). DeepSpeed renormalises the survivors.
    - `drop_policy="probs"` keeps, per expert, the pairs with the highest routing weight (Megatron
      ranks by this probability). DeepSpeed's `topkgating` ranks by the raw softmax gate: the same
      order with `normalize_topk=False`, but with `normalize_topk=True` a token's weights are its
      gates divided by its own top-k sum, so the two keep different pairs once an expert overflows
      (random logits, 64 tokens, 8 experts, k 3, capacity 12: in each of 5 seeds, 16 to 24 of the
      192 pairs are kept by one ranking and dropped by the other). `drop_policy="position"` keeps
      the earliest tokens, and first choices fill slots before second choices (GShard/DeepSpeed
      `top2gating`); Megatron's "position" ignores the choice rank, so the two agree for k=1
      only. Ties (k=1 after a post-softmax makes every weight 1) go to the earlier token;
      Megatron leaves them to `torch.topk`'s unspecified order.
    - `pad_to_capacity=True` gives every expert exactly C rows (zero rows as padding): static
      shapes, no host read and no count exchange (a compiled layer is one graph). Every rank of
      an expert group then needs the same number of tokens per call (C follows it, as in
      Megatron's drop-and-pad); ranks that differ raise, naming this.
    - Aux loss (Megatron's normalisation, 1 at perfect balance):
      `L = E/(k*T^2) * sum_i (sum_t p_ti) * count_i = E * sum_i f_i P_i` with `p` the full softmax
      (or normalised sigmoid) and `count` the top-k selections before any drop. `seq_aux_loss`
      computes it per sequence and averages. `global_aux_loss` takes f from counts all-reduced over
      every rank and summed over the micro-batches of the optimizer step so far (Megatron's global
      batch balancing; P stays local). z-loss: `mean_t logsumexp(logits_t)^2`.
    - `type` picks the router from the registry (`moeflow.moe.routers.register_router`):
      `"topk"`; `"null"` (AdaMoE: `num_null_experts` null experts); `"moepp"` (MoE++:
      `zero_experts`, `copy_experts`, `constant_experts` beside the FFN experts, `gating_residual`,
      balancing weight `zc_tau` for them); `"rmoe"` (a GRU of width `rnn_dim` shared by the layers).
      A router's own fields are rejected for other types.
    - `softmax_dtype` (None: the router's dtype): the softmax, the top-k and the renormalisation
      run in exactly this dtype and the weights return in the logits' dtype. `"fp32"` is what
      Hugging Face's MoE routers do, also in a float64 model (`softmax(..., dtype=torch.float)`).
    - `bias_update_rate > 0`: aux-loss-free balancing (DeepSeek-V3). A per-expert bias is added to
      the scores for selection only; after each optimizer step `bias_i += rate * sign(mean load -
      load_i)`, with loads counted over the step and all ranks (`finish_optimizer_step`). It is
      DeepSeek-V3's `e_score_correction_bias`.
    - `n_group > 1`: group-limited (node-limited) routing, DeepSeek's. The experts form `n_group`
      equal groups; each token keeps the `topk_group` groups with the best group score and
      chooses its k experts among theirs. A group's score is its best expert's for softmax scores
      (DeepSeek-V2's `group_limited_greedy`) and the sum of its best two for sigmoid scores
      (DeepSeek-V3), on the selection key (bias included). The other groups are masked with
      -inf, as transformers' DeepSeek routers do (DeepSeek-V2's released code masks with 0: the
      same choice, since k never exceeds the kept groups' experts and scores are positive).
    - `routed_scaling_factor` multiplies the routed experts' weights after any normalisation
      (DeepSeek-V2/V3; 1 elsewhere). `normalize_topk` is transformers' `norm_topk_prob`.

    Example:
        >>> RouterConfig(top_k=1, pre_softmax=True, normalize_topk=False).capacity_factor is None
        True
    """

    top_k: int = 2
    score_function: str = "softmax"
    pre_softmax: bool = False
    normalize_topk: bool = True
    capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    aux_loss_type: str = "aux_loss"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    input_jitter_eps: float | None = None
    router_dtype: str = "fp32"
    softmax_dtype: str | None = None
    type: str = "topk"
    num_null_experts: int = 0
    zero_experts: int = 0
    copy_experts: int = 0
    constant_experts: int = 0
    gating_residual: bool = True
    zc_tau: float = 1.0
    rnn_dim: int = 128
    bias_update_rate: float = 0.0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        self.validate("router")

    def validate(self, path: str) -> None:
        """Raise `ValueError` naming `path.field` for the first invalid field."""
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"{path}.top_k ({self.top_k!r}) must be an integer >= 1")
        check_choice(f"{path}.score_function", self.score_function, SCORE_FUNCTIONS)
        check_choice(f"{path}.drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice(f"{path}.aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES)
        check_choice(f"{path}.router_dtype", self.router_dtype, ROUTER_DTYPES)
        check_choice(f"{path}.softmax_dtype", self.softmax_dtype, (None, *ROUTER_DTYPES))
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"{path}.capacity_factor ({self.capacity_factor!r}) must be > 0, "
                "or None for dropless routing"
            )
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"{path}.min_capacity ({self.min_capacity!r}) must be an integer >= 0")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError(
                f"{path}.pad_to_capacity (True) needs {path}.capacity_factor; "
                "dropless routing has no capacity to pad to"
            )
        check_non_negative(f"{path}.aux_loss_coeff", self.aux_loss_coeff)
        check_non_negative(f"{path}.z_loss_coeff", self.z_loss_coeff)
        if self.input_jitter_eps is not None and not 0 < self.input_jitter_eps < 1:
            raise ValueError(
                f"{path}.input_jitter_eps ({self.input_jitter_eps!r}) must be in (0, 1), or None"
            )
        check_non_negative(f"{path}.bias_update_rate", self.bias_update_rate)
        self._validate_groups(path)
        self._validate_router_fields(path)

    def _validate_groups(self, path: str) -> None:
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{path}.{name} ({value!r}) must be an integer >= 1")
        if self.topk_group > self.n_group:
            raise ValueError(
                f"{path}.topk_group ({self.topk_group}) must be <= {path}.n_group ({self.n_group})"
            )
        if self.n_group > 1 and self.type != "topk":
            raise ValueError(
                f"{path}.n_group ({self.n_group}) groups the FFN experts of {path}.type = 'topk'; "
                f"this router is {self.type!r}"
            )
        if not (isinstance(self.routed_scaling_factor, int | float)
                and self.routed_scaling_factor > 0):  # fmt: skip
            raise ValueError(
                f"{path}.routed_scaling_factor ({self.routed_scaling_factor!r}) must be > 0"
            )

    def _validate_router_fields(self, path: str) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise ValueError(f"{path}.type ({self.type!r}) must be a router name, e.g. 'topk'")
        for name in ("num_null_experts", "zero_experts", "copy_experts", "constant_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{path}.{name} ({value!r}) must be an integer >= 0")
        if not isinstance(self.rnn_dim, int) or self.rnn_dim < 1:
            raise ValueError(f"{path}.rnn_dim ({self.rnn_dim!r}) must be an integer >= 1")
        if not self.zc_tau > 0:
            raise ValueError(f"{path}.zc_tau ({self.zc_tau!r}) must be > 0")
        defaults = RouterConfig.__dataclass_fields__
        owned = {
            "null": ("num_null_experts",),
            "moepp": ("zero_experts", "copy_experts", "constant_experts", "gating_residual",
                      "zc_tau"),
            "rmoe": ("rnn_dim",),
        }  # fmt: skip
        for router, names in owned.items():
            if self.type == router:
                continue
            for name in names:
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(
                        f"{path}.{name} ({getattr(self, name)!r}) only applies to "
                        f"{path}.type = {router!r} (this router is {self.type!r})"
                    )
        if self.type == "null" and self.num_null_experts < 1:
            raise ValueError(f"{path}.num_null_experts must be >= 1 for {path}.type = 'null'")
        zc = self.zero_experts + self.copy_experts + self.constant_experts
        if self.type == "moepp" and zc < 1:
            raise ValueError(
                f"{path}.type = 'moepp' needs at least one of {path}.zero_experts, "
                f"{path}.copy_experts, {path}.constant_experts"
            )

    @property
    def extra_experts(self) -> int:
        """Choices beyond the FFN experts: null or zero-computation experts."""
        if self.type == "null":
            return self.num_null_experts
        if self.type == "moepp":
            return self.zero_experts + self.copy_experts + self.constant_experts
        return 0


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """Shape of one MoE layer: `hidden_size` D, `num_experts` E, `ffn_hidden_size` F per expert.

    `activation`: `swiglu` (`silu(x W_gate) * (x W_up)`), `gelu` (erf), `gelu_tanh` (its tanh
    approximation, GPT-2's `gelu_new`) or `relu`.

    `ffn_bias`: every routed expert computes `act(x W1 + b1) W2 + b2` (`nn.Linear`-style biases,
    as GPT-2's MLP and DeepSpeed's experts have). `b1` is stored as the last row of `w1` (`[E, D+1,
    g*F]`: it travels, shards and is gathered with w1's columns); `b2` is the layer's
    `ffn_out_bias [E, D]`, held by every rank like the router and added after the combine, weighted
    by each kept pair's gate (a dropped pair gets no bias, as it gets no expert output).

    `a2a_dim` r < D: the low-dimension all-to-all (BigMac, descend-communicate-communicate-ascend;
    `moeflow.moe.low_dim`). Tokens are projected down to r before dispatch and the combined output
    back up to D after it: `out = (sum_k g_k E_k(x A_down) [+ b2]) A_up`, with `A_down [D, r]`,
    `A_up [r, D]` dense and every expert an FFN r -> F -> r. The router reads x at full width; a
    shared expert and zero-computation experts work at full width. Every all-to-all moves r values
    per row instead of D.

    `expert_kernel`: how the local experts run (`moeflow.moe.grouped_mm_ffn`): `loop`, one GEMM
    pair and the activation per expert block (few large experts on CPU); `grouped_mm`, each
    projection of all local experts in one `torch.nn.functional.grouped_mm` call and each
    elementwise step over the whole buffer, wherever it can run (no float64, no `ffn_bias`, 16-byte
    rows); `grouped_loop`, the same whole-buffer steps with one `torch.mm` per expert (no
    `ffn_bias`); `auto` (default): grouped_mm on CUDA in bf16, grouped_loop on CPU with 32 or
    more local experts (many small experts), the loop elsewhere.

    Router weights: with F <= D (the experts' row width: `a2a_dim` or D) the experts weight their
    own output rows (each row carries its pair's weight, nothing is kept for the weights'
    gradient, whose passes run over F-wide activations); with F > D the combine weights the
    rows and keeps them for the weights' gradient (D-wide passes, D values per row more kept),
    and no weight travels. Both give the same function and gradients. With F <= D, where no row
    travels (one rank in the expert group, or the `dp` mode; overlap degree 1, no
    `pad_to_capacity`) and the kernel is not `grouped_mm`, the experts gather their rows of the
    tokens (and of the output gradient) themselves: no `[T*K, D]` input row buffer is written or
    kept, and the results are bitwise those of the buffered path (`moeflow.comm.local_compute`).

    Shared experts (DeepSeek-V2/V3, Qwen2-MoE; Megatron's `moe_shared_expert_intermediate_size`):
    `shared_expert_ffn_hidden_size` F_s > 0 adds an always-on FFN of width F_s (n shared experts
    of width F are one FFN of width n*F: their sum is the FFN over the concatenated columns) whose
    output is added to the routed experts'; `shared_expert_gate` scales it per token by
    `sigmoid(x w_g)` (Qwen2-MoE's `shared_expert_gate`). It uses `activation`, and runs while the
    tokens travel to their experts (`moeflow.moe.shared_expert`).

    Example:
        >>> cfg = MoEConfig(hidden_size=64, num_experts=8, ffn_hidden_size=128)
        >>> MoEConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    hidden_size: int
    num_experts: int
    ffn_hidden_size: int
    activation: str = "swiglu"
    router: RouterConfig = field(default_factory=RouterConfig)
    shared_expert_ffn_hidden_size: int = 0
    shared_expert_gate: bool = False
    ffn_bias: bool = False
    a2a_dim: int | None = None
    expert_kernel: str = "auto"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_experts", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"moe.{name} ({value!r}) must be an integer >= 1")
        check_choice("moe.activation", self.activation, ACTIVATIONS)
        shared = self.shared_expert_ffn_hidden_size
        if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
            raise ValueError(
                f"moe.shared_expert_ffn_hidden_size ({shared!r}) must be an integer >= 0 "
                "(0: no shared expert)"
            )
        r = self.a2a_dim
        if r is not None and (
            not isinstance(r, int) or isinstance(r, bool) or not 1 <= r < self.hidden_size
        ):
            raise ValueError(
                f"moe.a2a_dim ({r!r}) must be an integer in 1..{self.hidden_size - 1} (below "
                "moe.hidden_size), or unset for the full width"
            )
        check_choice(
            "moe.expert_kernel", self.expert_kernel, ("auto", "loop", "grouped_mm", "grouped_loop")
        )
        if not isinstance(self.ffn_bias, bool):
            raise ValueError(f"moe.ffn_bias ({self.ffn_bias!r}) must be true or false")
        if not isinstance(self.shared_expert_gate, bool):
            raise ValueError(
                f"moe.shared_expert_gate ({self.shared_expert_gate!r}) must be true or false"
            )
        if self.shared_expert_gate and not shared:
            raise ValueError(
                "moe.shared_expert_gate needs a shared expert: set "
                "moe.shared_expert_ffn_hidden_size > 0"
            )
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"moe.router must be a RouterConfig, got {type(self.router).__name__}")
        self._check_groups()
        choices = self.num_experts + self.router.extra_experts
        if self.router.top_k > choices:
            raise ValueError(
                f"moe.router.top_k ({self.router.top_k}) must be <= moe.num_experts "
                f"({self.num_experts})"
                + (f" + {self.router.extra_experts} extra experts" if choices > self.num_experts
                   else "")
            )  # fmt: skip

    def _check_groups(self) -> None:
        """The experts split into `n_group` equal groups, enough of them kept for `top_k`."""
        r, e = self.router, self.num_experts
        if r.n_group == 1:
            return
        per = e // r.n_group
        if e % r.n_group or (per < 2 and r.score_function == "sigmoid"):
            raise ValueError(
                f"moe.router.n_group ({r.n_group}) must divide moe.num_experts ({e}) into equal "
                "groups" + (" of at least 2 (a sigmoid group scores by its best two)"
                            if r.score_function == "sigmoid" else "")
            )  # fmt: skip
        if r.top_k > r.topk_group * per:
            raise ValueError(
                f"moe.router.top_k ({r.top_k}) must be <= topk_group ({r.topk_group}) x "
                f"{per} experts per group: the kept groups hold the choices"
            )

    @property
    def expert_dim(self) -> int:
        """The width the experts read and write, and the all-to-all moves: `a2a_dim` or D."""
        return self.a2a_dim or self.hidden_size

    def to_dict(self) -> dict:
        """Plain nested dict (TOML/JSON friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        """Build from a nested dict; unknown keys raise `ValueError` naming them."""
        data = dict(data)
        router = data.pop("router", {})
        _reject_unknown("moe", data, cls)
        if isinstance(router, dict):
            _reject_unknown("moe.router", router, RouterConfig)
            router = RouterConfig(**router)
        return cls(router=router, **data)

    def fingerprint(self) -> str:
        """A short stable hash of every field: ranks compare it to detect mismatched configs."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _reject_unknown(path: str, data: dict, cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; known fields are {sorted(known)}")
