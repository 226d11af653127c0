"""Argument types for the example scripts: every setting is checked while parsing.

A bad value becomes an argparse error naming the option and the value (exit
status 2) before any data is read, never a traceback from deep in a run.
"""
import argparse

from ..kinds import MarginSettings

__all__ = ["DefaultsFormatter", "positive_int", "non_negative_int", "positive_float", "non_negative_float", "shape",
           "check_margin_settings"]


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help; an option whose help already states its
    default (one that depends on another option) is left as written."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _number(kind, text, accept, condition):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {condition}, got {text!r}") from None
    if value != value or not accept(value):  # value != value: NaN
        raise argparse.ArgumentTypeError(f"expected {condition}, got {text!r}")
    return value


def positive_int(text):
    return _number(int, text, lambda v: v > 0, "an integer > 0")


def non_negative_int(text):
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    return _number(float, text, lambda v: 0 < v < float("inf"), "a finite number > 0")


def non_negative_float(text):
    return _number(float, text, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def shape(text):
    """'NxDxC' -> (N, D, C), three integers > 0."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected NxDxC with three integers > 0, got {text!r}")
    return values


def check_margin_settings(parser, kind, **values):
    """The kind's settings through MarginSettings, as a parser error naming the bad one."""
    try:
        return MarginSettings(kind, **values)
    except ValueError as error:
        parser.error(str(error))
