"""The parallel degrees of a run, and every product of them, in one value.

    dims = ParallelDims.from_world(8, tp=2, pp=2)     # dp derived: 2
    dims.world_size, dims.model_parallel_size         # 8, 4
    dims.describe()                                   # 'tp=2 pp=2 dp=2'

megatron-core orders the ranks of a world as tp x cp x dp x pp (``initialize_model_parallel``);
flagscale only needs the sizes. Code that multiplies degrees asks this class instead of writing
``tp * pp * dp`` out, so a new dimension (``cp``) changes one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flagscale.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Tensor, pipeline, context and data-parallel sizes, plus virtual pipeline stages."""

    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size (each sequence split across ``cp`` ranks)."""
    dp: int
    """Data-parallel size."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank; ``None`` when not interleaved."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Parallel size {name}={value!r} must be an integer >= 1.")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 1):
            raise ConfigError(f"Parallel size vpp={self.vpp!r} must be None or an integer >= 1.")
        if self.vpp == 1:
            # One virtual stage is no interleaving: one spelling of it, so layouts compare equal.
            object.__setattr__(self, "vpp", None)

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one replica of the model: tp * pp * cp."""
        return self.tp * self.pp * self.cp

    @property
    def world_size(self) -> int:
        """Processes the layout needs: tp * pp * cp * dp."""
        return self.model_parallel_size * self.dp

    @property
    def stages(self) -> int:
        """Model chunks the layers are split into: pp * vpp."""
        return self.pp * (self.vpp or 1)

    @classmethod
    def from_world(cls, world_size: int, *, tp: int, pp: int, cp: int = 1,
                   dp: Optional[int] = None, vpp: Optional[int] = None) -> "ParallelDims":
        """The layout of ``world_size`` processes; ``dp`` (when None) takes what tp*pp*cp leave.

        Raises :class:`ConfigError` with the arithmetic when the sizes do not multiply to the
        world size.
        """
        model = cls(tp=tp, pp=pp, cp=cp, dp=1).model_parallel_size
        terms = f"tp({tp}) * pp({pp}) * cp({cp})"
        if dp is None:
            if world_size < 1 or world_size % model:
                raise ConfigError(f"{terms} * dp(?) != world size ({world_size}): the world size "
                                  f"must be a multiple of tp*pp*cp={model}.")
            dp = world_size // model
        elif model * dp != world_size:
            raise ConfigError(f"{terms} * dp({dp}) = {model * dp} != world size ({world_size}): "
                              f"launch {model * dp} processes or drop parallel.dp.")
        return cls(tp=tp, pp=pp, cp=cp, dp=dp, vpp=vpp)

    def describe(self) -> str:
        """``tp=2 pp=1 dp=1`` (``cp=N`` when > 1, ``vpp=N`` when interleaved)."""
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return f"tp={self.tp} pp={self.pp}{cp} dp={self.dp}{vpp}"

    def to_dict(self) -> dict:
        """``{"tp", "pp", "cp", "dp", "vpp"}``, as recorded in checkpoints."""
        return {"tp": self.tp, "pp": self.pp, "cp": self.cp, "dp": self.dp, "vpp": self.vpp}

    @classmethod
    def from_dict(cls, data: dict) -> "ParallelDims":
        """Inverse of :meth:`to_dict`; a missing ``cp`` (checkpoints before it existed) is 1."""
        return cls(tp=data["tp"], pp=data["pp"], cp=data.get("cp") or 1, dp=data["dp"],
                   vpp=data.get("vpp") or None)
