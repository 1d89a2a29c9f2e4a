"""`Result`: a model measured by one protocol, which it names."""

from dataclasses import asdict, dataclass


@dataclass
class Result:
    model: str
    metric: str
    value: float
    higher_is_better: bool
    protocol: str
    samples: int
    agreement: float | None = None  # % of predictions equal to the reference model's, where one was given
    extra: dict | None = None  # secondary metrics of the same protocol (e.g. perplexity beside bits per byte)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}
