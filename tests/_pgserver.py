"""A throwaway PostgreSQL server for the test session.

:class:`PostgresServer` runs ``initdb`` into a temporary directory and starts
``postgres`` on a free port of 127.0.0.1 (with ``fsync`` on, and its unix
socket inside the temporary directory). PostgreSQL refuses to run as root: when
the tests run as root, the server runs as the unprivileged ``postgres`` user
that Debian's server package creates.

``stop()`` and ``start()`` stop the server and start it again on the same data
directory and port, for the tests where the database goes away mid-use.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["PostgresNotFound", "PostgresServer", "find_bindir"]


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries (``initdb``, ``pg_ctl``) were found."""


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def find_bindir() -> Path:
    """Return the directory holding ``initdb`` and ``pg_ctl``.

    Looks at ``pg_config --bindir``, then ``/usr/lib/postgresql/*/bin`` (newest
    first), then ``initdb`` on the ``PATH``.

    Raises:
        PostgresNotFound: none of them has both programs.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            candidates.append(Path(out))
    candidates.extend(
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)[::-1]
    )
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(os.path.realpath(initdb)).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise PostgresNotFound(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir`, "
        "/usr/lib/postgresql/*/bin and initdb on PATH); run .ci/install-postgres"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """A PostgreSQL server in a temporary directory, for tests.

    Use :meth:`create` (or the class as a context manager), :attr:`dsn` to
    connect, :meth:`stop` / :meth:`start` to take it away and bring it back, and
    :meth:`destroy` to stop it and remove its files.
    """

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir if bindir is not None else find_bindir()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="trio-aggregates-pg-"))
        self.datadir = self.tmpdir / "data"
        self.logfile = self.tmpdir / "server.log"
        self.port = _free_port()
        self.user = "postgres"
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                raise PostgresNotFound(
                    "running as root and there is no `postgres` user to run the server as"
                ) from None
            self._run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            os.chown(self.tmpdir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.tmpdir, 0o700)
        self.running = False

    @property
    def dsn(self) -> str:
        """A libpq key/value DSN for the ``postgres`` database."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        """A libpq key/value DSN for ``dbname`` on this server."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def url_for(self, dbname: str) -> str:
        """A ``postgresql://`` URL for ``dbname`` on this server."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(
            args,
            cwd=self.tmpdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._run_as,
        )
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}\n{log[-4000:]}"
            )

    def init(self) -> None:
        """Run ``initdb`` and write the server's configuration."""
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # initdb's own final fsync; the server itself runs with fsync on
        )
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                "\n# trio_aggregates test server\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.tmpdir}'\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                "max_connections = 200\n"
                "log_min_messages = warning\n"
            )

    def start(self) -> None:
        """Start the server (again) on the same data directory and port; wait until ready."""
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, roll back their transactions)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")
        self.running = False

    def destroy(self) -> None:
        """Stop the server if it runs, and remove its directory."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    @classmethod
    def create(cls) -> PostgresServer:
        """Make, initialize and start a server.

        Raises:
            PostgresNotFound: no server binaries are installed.
            RuntimeError: initdb or the server failed (the message has the log).
        """
        server = cls()
        try:
            server.init()
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()
