"""The scripts' one error policy: a user's mistake ends the run with one line and exit code 2; a bug raises."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional, Sequence

from al.config import ConfigError
from al.data.base import DatasetError
from al.folder_lock import FolderLockedError
from al.labels import JournalCorruptError

# What the user fixes in the config, the data or the command: a bad key or value, a bad dataset, a
# damaged label journal, a folder another run holds, a missing or unreadable file (OSError). Not
# KeyError, ValueError or the like: raised deep inside, they are bugs and need their traceback.
USER_ERRORS = (ConfigError, DatasetError, JournalCorruptError, FolderLockedError, OSError)

Main = Callable[[Optional[Sequence[str]]], int]


def cli_entry(*script_errors: type[BaseException]) -> Callable[[Main], Main]:
    """Decorate a script's ``main(argv=None) -> int``: USER_ERRORS and ``script_errors`` (the script's
    own user errors) print ``error: <message>`` on stderr and make it return 2; anything else raises.

        @cli_entry()
        def main(argv=None) -> int: ...

        if __name__ == "__main__":
            sys.exit(main())
    """
    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> int:
            try:
                return main(argv)
            except (*USER_ERRORS, *script_errors) as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
        return run
    return decorate
