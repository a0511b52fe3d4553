"""``msxplain`` / ``run.py``: parse, configure, run a level, print, return an exit code.

Exit codes follow the BIDS Apps execution spec (see :mod:`bids_app.errors`). The participant
level is :func:`bids_app.app.participant.run_participant` (sessions that fail while others
succeed: one line each, and the code of the first), the group level
:func:`bids_app.app.group.run_group`. SIGTERM and SIGINT end every process of the run
(:mod:`bids_app.cli.shutdown`) and exit 143 or 130.
"""

from __future__ import annotations

import logging
import os
import sys

from bids_app.errors import MsxplainError

LOGGER = logging.getLogger("bids_app")


def main(argv: list[str] | None = None) -> int:
    """Run msxplain; returns the BIDS-Apps exit code."""
    from bids_app.app.runlog import setup_console
    from bids_app.cli.parser import parse_args

    argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        ns = parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or usage errors (64/17)
        return int(exc.code or 0)
    setup_console(ns.verbose)
    offline_before = os.environ.get("MSXPLAIN_OFFLINE")
    if ns.offline:  # read by bids_app.bids.templates, here and in every worker process
        os.environ["MSXPLAIN_OFFLINE"] = "1"
    from bids_app.app.config import Config
    from bids_app.app.runlog import LogBuffer

    buffer = LogBuffer()
    try:
        config = Config.from_args(ns, argv=argv)
        if config.execution.analysis_level == "participant":
            from bids_app.app.participant import run_participant
            from bids_app.cli.shutdown import RunInterrupted, terminate_on_signals

            try:
                with terminate_on_signals():
                    return run_participant(config, buffer)
            except RunInterrupted as exc:
                return _interrupted(exc, config)
        from bids_app.app.group import run_group

        try:
            return run_group(config)
        finally:
            group_dir = config.execution.output_dir / "group"
            if group_dir.is_dir():
                buffer.write_to(group_dir / "log" / config.execution.run_uuid / "group_msxplain.log")
    except MsxplainError as exc:
        LOGGER.error("%s", exc.one_line(), extra={"console": False})  # printed once, below
        print(f"msxplain: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("msxplain: interrupted; re-run with the same --work-dir to resume.", file=sys.stderr)
        return 130
    finally:
        buffer.close()
        if ns.offline:  # main() may run several times in one process (tests, rerun)
            if offline_before is None:
                os.environ.pop("MSXPLAIN_OFFLINE", None)
            else:
                os.environ["MSXPLAIN_OFFLINE"] = offline_before


def _interrupted(exc, config) -> int:
    """After SIGTERM/SIGINT (the run's processes are ended): remove what they were staging, say how to resume."""
    from bids_app.bids.commit import remove_staging_of

    ex = config.execution
    try:
        remove_staging_of(ex.output_dir, [os.getpid(), *exc.ended])
    except OSError:
        pass
    LOGGER.error("Stopped by %s: %d process(es) of the run ended.", signal_name(exc.signum), len(exc.ended),
                 extra={"console": False})
    print(f"msxplain: stopped by {signal_name(exc.signum)}; every process of the run was ended and no session "
          f"was left half-written. To resume, re-run the same command with the same work folder (-w "
          f"{ex.work_dir}): finished steps are not recomputed.", file=sys.stderr)
    return exc.exit_code


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def main_exit() -> None:  # console-script entry point
    sys.exit(main())
