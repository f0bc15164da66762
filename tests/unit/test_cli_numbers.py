"""Every number the CLI takes is finite and sane, or the command stops with exit 2 before signing or sending."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from meshjobs.cli import main
from meshjobs.cli._common import DAY_S, WEEK_S, Bounded, Fraction, Seconds

#: Options still on click's own float types, in files edited elsewhere at the moment.
#: strict xfail: once they move to Seconds, these entries must go.


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def numeric_options() -> Iterator[tuple[tuple[str, ...], click.Command, click.Option]]:
    for path, command in commands():
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(
                param.type, (click.types.FloatParamType, click.types.IntParamType, Bounded)
            ):
                yield path, command, param


def dummy_arguments(command: click.Command) -> list[str]:
    """Plausible values for the command's required arguments, so only the option can be at fault."""
    return [
        "demo.add" if p.name == "capability" else "x:y"
        for p in command.params
        if isinstance(p, click.Argument) and p.required
    ]


CASES = [
    pytest.param(path, command, option, id=f"{' '.join(path)} {option.opts[0]}")
    for path, command, option in numeric_options()
]
BAD = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1", "1e12", "abc", ""]


def test_the_cases_cover_every_float_option() -> None:
    names = {f"{' '.join(p)} {o.opts[0]}" for p, _, o in numeric_options()}
    expected = {"submit --timeout", "submit --min-trust", "submit --peer-wait", "submit --wait", "peers --timeout"}
    expected |= {"jobs result --wait", "jobs wait --timeout", "worker --drain-timeout", "worker --retry-delay"}
    expected |= {"mesh up --timeout", "persona --drain-timeout", "persona --retry-delay", "celery-bridge --timeout"}
    assert expected <= names


@pytest.mark.parametrize("path, command, option", CASES)
def test_bad_numbers_are_refused_before_anything_happens(
    path: tuple[str, ...], command: click.Command, option: click.Option, tmp_path: Path
) -> None:
    if not isinstance(option.type, click.IntRange):
        assert isinstance(option.type, Bounded), f"{option.opts[0]} takes {option.type!r}: use Seconds or Fraction"
    else:  # click's IntRange refuses nan and inf (int() does), and must be bounded on both ends
        assert option.type.min is not None and option.type.max is not None
    home = tmp_path / "home"
    env = {"MESHJOBS_HOME": str(home), "MESHJOBS_SERVER": "nats://127.0.0.1:1"}
    runner = CliRunner()
    for bad in BAD:
        args = [*path, f"{option.opts[0]}={bad}", *dummy_arguments(command)]
        out = runner.invoke(main, args, env=env)
        assert out.exit_code == 2, (args, out.output)
        errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and option.opts[0] in errors[0], out.output
        # Nothing signed, nothing sent: not even an identity was created.
        assert not home.exists(), args


def test_the_types_accept_sane_values_and_say_why_they_refuse() -> None:
    seconds = Seconds(max=DAY_S, positive=True)
    assert seconds.convert("0.5", None, None) == 0.5 and seconds.convert(" 30 ", None, None) == 30.0
    assert seconds.convert(DAY_S, None, None) == DAY_S and seconds.convert(2, None, None) == 2.0
    assert Seconds(max=WEEK_S).convert("0", None, None) == 0.0
    assert Fraction().convert("1", None, None) == 1.0 and Fraction().convert("0", None, None) == 0.0
    refusals = {
        "nan": "not a finite number",
        "-inf": "not a finite number",
        "0": "more than 0 and at most 86400 seconds",
        "86400.5": "out of range",
        "1_0x": "not a number",
    }
    for value, message in refusals.items():
        with pytest.raises(click.BadParameter, match=message):
            seconds.convert(value, None, None)
    with pytest.raises(click.BadParameter, match="at least 0 and at most 1"):
        Fraction().convert("1.01", None, None)
    with pytest.raises(click.BadParameter):
        Fraction().convert(True, None, None)
    # The reason this type exists:
    nan = click.FloatRange(0, 1)("nan")
    assert nan != nan


def test_help_names_the_unit() -> None:
    out = CliRunner().invoke(main, ["submit", "--help"])
    assert "--timeout SECONDS" in out.output and "--min-trust FRACTION" in out.output
