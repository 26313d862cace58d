"""Exceptions kuas raises on bad input: each names the problem and how to fix it."""

from __future__ import annotations

import os


class KuasError(Exception):
    """Base class of every error kuas raises on purpose."""


class CheckpointError(KuasError):
    """A weights file cannot be read or does not fit the model.

    The message always starts with the file's path so that a user with many files knows which one.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UnsafeCheckpointError(CheckpointError):
    """A pickle tried to reach a global outside the allow-list (it could run code): refused."""


class InvalidInputError(KuasError, ValueError):
    """An argument is out of range or malformed (sizes, steps, strength, sampler names, images...)."""
