"""A local Hugging Face Hub for tests: olah serving git repos from a folder, on 127.0.0.1 only.

olah 0.5.x (PyPI) serves ``<mirrors>/models/<org>/<repo>`` when it is a non-bare git repository with
the files committed on ``main``; it accepts no uploads. The server is wrapped in ``timeout`` so it
stops by itself even if the test process dies, and is terminated when the context exits.
"""
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Union

OLAH_CLI = Path(sys.executable).with_name('olah-cli')
MAX_LIFETIME_S = 900


def add_repo(mirrors: Path, repo_id: str, files: Dict[str, Union[bytes, Path]]) -> Path:
    """Create ``mirrors/models/<repo_id>`` as a git repo with ``files`` committed on ``main``."""
    repo = mirrors / 'models' / repo_id
    repo.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, repo / name)
        else:
            (repo / name).write_bytes(content)
    git = ['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost', '-c', 'commit.gpgsign=false']
    subprocess.run(['git', 'init', '-q', '-b', 'main'], cwd=repo, check=True)
    subprocess.run(git + ['add', '-A'], cwd=repo, check=True)
    subprocess.run(git + ['commit', '-q', '-m', 'add files'], cwd=repo, check=True)
    return repo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextmanager
def local_hub(mirrors: Path, probe_repo: str, workdir: Path, start_timeout: float = 60.) -> Iterator[str]:
    """Serve ``mirrors`` with olah on 127.0.0.1; yields the endpoint URL for ``HF_ENDPOINT``."""
    if not OLAH_CLI.exists():
        raise RuntimeError(f'{OLAH_CLI} not found: install the dev extra (pip install -e ".[dev]").')
    port = _free_port()
    config = workdir / 'olah.toml'
    config.write_text(
        '[basic]\n'
        'host = "127.0.0.1"\n'
        f'port = {port}\n'
        f'mirrors-path = ["{mirrors}"]\n'
        f'repos-path = "{workdir / "olah-repos"}"\n'
        '[accessibility]\n'
        'offline = true\n')
    log = open(workdir / 'olah.log', 'wb')
    proc = subprocess.Popen(
        ['timeout', str(MAX_LIFETIME_S), str(OLAH_CLI), '--config', str(config)],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + start_timeout
        probe = f'{endpoint}/{probe_repo}/resolve/main/config.json'
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f'olah exited with {proc.returncode}: {(workdir / "olah.log").read_text()[-2000:]}')
            try:
                urllib.request.urlopen(urllib.request.Request(probe, method='HEAD'), timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if time.time() > deadline:
                    raise RuntimeError(f'olah did not answer {probe} within {start_timeout}s') from e
                time.sleep(0.25)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
