"""What a kernelspec asks Slurm for (its ``slurm`` mapping), validated, as ``sbatch`` flags."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# key -> sbatch flag, in the order they are written
FLAGS = {
    "partition": "--partition",
    "time": "--time",
    "gpus": "--gpus",
    "gres": "--gres",
    "cpus": "--cpus-per-task",
    "mem": "--mem",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
}
KEYS = (*FLAGS, "options", "queue_timeout", "job")
DEFAULT_QUEUE_TIMEOUT = 3600.0  # seconds a kernel start waits for its job to leave the queue
WHERE = "metadata.kernel_provisioner.config.slurm"


@dataclass(frozen=True)
class SlurmRequest:
    """The resources of one kernel's job, and how long its start may wait in the queue."""

    values: tuple[tuple[str, str], ...] = ()  # (key, value) for the keys of FLAGS
    options: tuple[str, ...] = ()  # more sbatch flags, each one argument
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    job: int | None = None  # an allocation of the user's own (salloc) to run the kernel in

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], name: Callable[[str], str] = lambda key: f"{WHERE}.{key}"
    ) -> SlurmRequest:
        """Validate a kernelspec's ``slurm`` mapping; a ConfigError says what is wrong, with
        each key called what ``name`` makes of it (a command line calls it a flag)."""
        if not isinstance(config, Mapping):
            raise ConfigError(f'{WHERE} must be a mapping, e.g. {{"partition": "gpu"}}')
        unknown = sorted(set(config) - set(KEYS))
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))} in {WHERE}; "
                              f"valid keys: {', '.join(KEYS)}")  # fmt: skip
        values = tuple((key, _value(name(key), key, config[key])) for key in FLAGS if key in config)
        options = config.get("options") or []
        if isinstance(options, str) or not all(isinstance(o, str) for o in options):
            raise ConfigError(f"{name('options')} must be a list of sbatch flags, one per "
                              f'item, e.g. ["--exclusive", "--nice=10"]')  # fmt: skip
        for option in options:
            if not option.startswith("-") or _unsafe(option):
                raise ConfigError(f"{name('options')}: {option!r} is not an sbatch flag "
                                  f"(each item is one flag such as --exclusive)")  # fmt: skip
        queue_timeout = config.get("queue_timeout", DEFAULT_QUEUE_TIMEOUT)
        number = isinstance(queue_timeout, (int, float)) and not isinstance(queue_timeout, bool)
        if not number or queue_timeout <= 0:
            raise ConfigError(f"{name('queue_timeout')} must be a number of seconds > 0")
        job = config.get("job")
        if job is not None:
            if isinstance(job, bool) or not str(job).isdigit():
                raise ConfigError(f"{name('job')} must be a Slurm job id, e.g. 1234")
            if values or options or "queue_timeout" in config:
                raise ConfigError(f"{name('job')} runs the kernel in an allocation you made "
                                  f"(salloc); leave out the requests, the allocation has "
                                  f"its resources already")  # fmt: skip
            job = int(job)
        return cls(values, tuple(options), float(queue_timeout), job)

    def sbatch_args(self) -> list[str]:
        """The flags of the request, one argument each."""
        return [f"{FLAGS[key]}={value}" for key, value in self.values] + list(self.options)

    def sbatch_line(self) -> str:
        """The equivalent ``sbatch`` command line, for people to read or run by hand."""
        return shlex.join(["sbatch", *self.sbatch_args()])

    def as_config(self) -> dict[str, Any]:
        """The mapping as a kernelspec holds it."""
        config: dict[str, Any] = dict(self.values)
        if self.options:
            config["options"] = list(self.options)
        if self.queue_timeout != DEFAULT_QUEUE_TIMEOUT:
            config["queue_timeout"] = self.queue_timeout
        if self.job is not None:
            config["job"] = self.job
        return config


def _value(name: str, key: str, value: Any) -> str:
    if key in ("gpus", "cpus") and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or _unsafe(value):
        raise ConfigError(f"{name} must be a non-empty string without spaces, "
                          f"e.g. {EXAMPLES[key]!r}")  # fmt: skip
    return value.strip()


def _unsafe(text: str) -> bool:
    """Whitespace or control characters: never part of one sbatch flag's value."""
    return any(ch.isspace() or ord(ch) < 32 for ch in text.strip())


EXAMPLES = {
    "partition": "gpu", "time": "4:00:00", "gpus": "1", "gres": "gpu:a100:1", "cpus": "8",
    "mem": "32G", "account": "proj42", "qos": "normal", "constraint": "a100",
}  # fmt: skip
