"""The patched nova work tree: pinned base, series application, export."""

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
WORK = REPO / '.work'
CACHE = WORK / 'cache'
TREE = WORK / 'nova'
PATCHES = REPO / 'patches'
SERIES = PATCHES / 'series'
# Directories that exist only because the series creates them; this repo
# keeps a byte-identical copy of them at the same paths.
OVERLAY = ('nova/orchestration', 'nova/tests/orchestration',
           'doc/source/devref')
BASE_TAG = 'base'
# Fixed identities and dates make every commit id, and so every exported
# patch, a pure function of the series content.
_GIT_ENV = {
    'GIT_AUTHOR_NAME': 'nova sdist', 'GIT_AUTHOR_EMAIL': 'sdist@nova.invalid',
    'GIT_AUTHOR_DATE': '2000-01-01T00:00:00Z',
    'GIT_COMMITTER_NAME': 'nova orchestration series',
    'GIT_COMMITTER_EMAIL': 'series@nova.invalid',
    'GIT_COMMITTER_DATE': '2000-01-01T00:00:00Z',
    'GIT_CONFIG_NOSYSTEM': '1', 'GIT_CONFIG_GLOBAL': '/dev/null',
}
# What a develop install, a test run or the docs build writes into the
# tree (nova's .gitignore, which the sdist lacks, ignores the same).
_EXCLUDES = ('*.egg-info/', '.stestr/', '__pycache__/', '*.pyc', '.tox/',
             'doc/build/', 'build/', '.tmp/', 'cover/', '.coverage*',
             'doc/source/_static/nova.conf.sample',
             'doc/source/_static/nova.policy.yaml.sample')


class HarnessError(Exception):
    """A failure with a message meant for the developer."""


def log(msg):
    print('harness: %s' % msg, flush=True)


def base_config():
    conf = {}
    for line in (REPO / 'tools' / 'nova-base.conf').read_text().splitlines():
        line = line.strip()
        if line and not line.startswith('#'):
            key, _, value = line.partition('=')
            conf[key.strip()] = value.strip()
    return conf


def git(tree, *args, env=None, check=True, capture=True):
    full_env = dict(os.environ, **_GIT_ENV)
    full_env.update(env or {})
    argv = ['git', '-c', 'safe.directory=*', '-C', str(tree)] + list(args)
    proc = subprocess.run(argv, env=full_env, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if check and proc.returncode:
        raise HarnessError('git %s failed in %s:\n%s' % (
            ' '.join(args), tree, proc.stdout or ''))
    return proc


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist():
    """Return the path of the verified nova sdist, downloading it once."""
    conf = base_config()
    name = 'nova-%s.tar.gz' % conf['version']
    path = CACHE / name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log('downloading %s from PyPI' % name)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run(
                [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
                 '--no-binary', ':all:', '-d', tmp,
                 'nova==%s' % conf['version']], check=True)
            shutil.move(os.path.join(tmp, name), path)
    actual = _sha256(path)
    if actual != conf['sha256']:
        path.unlink()
        raise HarnessError('%s has sha256 %s, tools/nova-base.conf pins %s' % (
            name, actual, conf['sha256']))
    return path


def _extract(sdist, dest):
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split('/')[0]
        tar.extractall(dest.parent / '.extract', filter='data')
    (dest.parent / '.extract' / top).rename(dest)
    (dest.parent / '.extract').rmdir()
    # Metadata pbr generated for the sdist; a develop install rewrites it.
    shutil.rmtree(dest / 'nova.egg-info')


def series():
    """The patch files listed in patches/series, in order."""
    if not SERIES.exists():
        return []
    names = [ln.strip() for ln in SERIES.read_text().splitlines()
             if ln.strip() and not ln.startswith('#')]
    missing = [n for n in names if not (PATCHES / n).exists()]
    if missing:
        raise HarnessError('patches/series lists missing files: %s' %
                           ', '.join(missing))
    return [PATCHES / n for n in names]


def write_excludes(dest):
    """Make git ignore what builds and test runs write into dest."""
    (dest / '.git' / 'info' / 'exclude').write_text(
        '\n'.join(_EXCLUDES) + '\n')


def materialise(dest, patches=None):
    """Create a git tree at dest: the base commit plus one per patch."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _extract(fetch_sdist(), dest)
    git(dest, 'init', '-q', '-b', 'master')
    write_excludes(dest)
    git(dest, 'add', '-A')
    git(dest, 'commit', '-q', '-m',
        'nova %s sdist (pinned base)' % base_config()['version'])
    git(dest, 'tag', BASE_TAG)
    for patch in series() if patches is None else patches:
        proc = git(dest, 'am', '-q', '--committer-date-is-author-date',
                   str(patch), check=False)
        if proc.returncode:
            git(dest, 'am', '--abort', check=False)
            raise HarnessError('patch %s does not apply exactly:\n%s' % (
                patch.name, proc.stdout))


def format_patches(tree, out_dir):
    """Write tree's commits since the base as patch files into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = git(tree, 'format-patch', '-q', '--zero-commit', '--no-signature',
               '--no-numbered', '--full-index', '--no-renames',
               '--diff-algorithm=myers', '--stat=80', '-o', str(out_dir),
               '%s..HEAD' % BASE_TAG)
    names = sorted(p.name for p in out_dir.glob('*.patch'))
    (out_dir / 'series').write_text(''.join(n + '\n' for n in names))
    return proc


def _overlay_files(root, tracked_in=None):
    """Relative paths of overlay files under root (git-tracked if asked)."""
    if tracked_in is not None:
        out = git(tracked_in, 'ls-files', '--', *OVERLAY).stdout
        return set(out.split())
    found = set()
    for top in OVERLAY:
        for path in (root / top).rglob('*'):
            if path.is_file() and '__pycache__' not in path.parts:
                found.add(str(path.relative_to(root)))
    return found


def overlay_differences(tree):
    """Describe every overlay file that differs between tree and repo."""
    in_tree = _overlay_files(tree, tracked_in=tree)
    in_repo = _overlay_files(REPO)
    problems = []
    for rel in sorted(in_tree - in_repo):
        problems.append('%s: created by the series, missing here' % rel)
    for rel in sorted(in_repo - in_tree):
        problems.append('%s: here, but the series does not create it' % rel)
    for rel in sorted(in_tree & in_repo):
        if (tree / rel).read_bytes() != (REPO / rel).read_bytes():
            problems.append('%s: differs from the series' % rel)
    base_has = git(tree, 'ls-tree', '-r', '--name-only', BASE_TAG, '--',
                   *OVERLAY).stdout.split()
    for rel in base_has:
        problems.append('%s: exists in the nova base; the overlay must only '
                        'hold files the series creates' % rel)
    return problems


SUMMARY_MAX = 72
BODY_WIDTH = 72
AI_TRAILERS = ('Generated-By:', 'Assisted-By:')
# nova's doc/source/contributor/commit-messages.rst: "area: Summary".
_AREA = re.compile(r'^[a-z][a-z0-9_.-]*(/[a-z0-9_.-]+)*: [A-Z0-9]')
# Trailers and the form each must have when present.
_TRAILERS = {
    'Generated-By': re.compile(r'^[A-Za-z0-9][\w.-]*( [\w.-]+)?$'),
    'Assisted-By': re.compile(r'^[A-Za-z0-9][\w.-]*( [\w.-]+)?$'),
    'Signed-off-by': re.compile(r'^[^<>@]+ <[^<>@\s]+@[^<>@\s]+>$'),
    'Implements': re.compile(r'^blueprint [a-z0-9][a-z0-9-]*$'),
    'Partially-Implements': re.compile(r'^blueprint [a-z0-9][a-z0-9-]*$'),
    'Closes-Bug': re.compile(r'^#?[0-9]+$'),
    'Partial-Bug': re.compile(r'^#?[0-9]+$'),
    'Related-Bug': re.compile(r'^#?[0-9]+$'),
    'Change-Id': re.compile(r'^I[0-9a-f]{40}$'),
}
_TRAILER_LINE = re.compile(r'^([A-Z][A-Za-z-]*): (.*)$')
IDENTITY = _TRAILERS['Signed-off-by']


def _footer(lines):
    """The trailing paragraph of lines if every line is a trailer."""
    paragraphs = '\n'.join(lines).strip().split('\n\n')
    last = paragraphs[-1].splitlines() if paragraphs else []
    if last and all(_TRAILER_LINE.match(line) and
                    _TRAILER_LINE.match(line).group(1) in _TRAILERS
                    for line in last):
        return last
    return []


def message_problems(subject, body, signed_off=False):
    """What a commit message lacks by nova's commit message guide.

    signed_off: also require a well-formed DCO Signed-off-by trailer.
    """
    problems = []
    if len(subject) > SUMMARY_MAX:
        problems.append('summary line of %d characters (at most %d)' % (
            len(subject), SUMMARY_MAX))
    if not _AREA.match(subject):
        problems.append('summary without an "area: Summary" prefix')
    if subject.endswith('.'):
        problems.append('summary ends with a period')
    text = subject + '\n' + body
    if not text.isascii():
        problems.append('non-ASCII characters')
    lines = body.strip('\n').splitlines()
    footer = _footer(lines)
    prose = lines[:len(lines) - len(footer)] if footer else lines
    if not any(line.strip() for line in prose):
        problems.append('no body saying why')
    for line in prose:
        # A URL or a long identifier cannot be wrapped.
        if len(line) > BODY_WIDTH and '://' not in line and max(
                len(word) for word in line.split()) <= BODY_WIDTH - 12:
            problems.append('body line of %d characters (wrap at %d)' % (
                len(line), BODY_WIDTH))
            break
        match = _TRAILER_LINE.match(line)
        if match and match.group(1) in _TRAILERS:
            problems.append('trailer %s outside the footer' % match.group(1))
    seen = [_TRAILER_LINE.match(line).groups() for line in footer]
    for name, value in seen:
        if not _TRAILERS[name].match(value):
            problems.append('malformed trailer %s: %r' % (name, value))
    names = [name for name, _ in seen]
    if not any(name + ':' in AI_TRAILERS for name in names):
        problems.append('no %s trailer' % ' or '.join(AI_TRAILERS))
    if signed_off and 'Signed-off-by' not in names:
        problems.append('no Signed-off-by trailer')
    return problems


def series_message_problems(tree):
    """Commit message problems of the series applied in tree."""
    out = git(tree, 'log', '--reverse', '--format=%s%x00%b%x01',
              '%s..HEAD' % BASE_TAG).stdout
    problems = []
    for number, entry in enumerate(out.split('\x01')[:-1], 1):
        subject, _, body = entry.strip('\n').partition('\x00')
        for problem in message_problems(subject, body):
            problems.append('patch %d (%s): %s' % (number, subject, problem))
    return problems


def tree_matches_series(tree):
    """True if tree is clean and exports exactly to patches/."""
    if not (tree / '.git').exists():
        return False
    if git(tree, 'status', '--porcelain').stdout.strip():
        return False
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        format_patches(tree, pathlib.Path(tmp))
        return _same_dir(pathlib.Path(tmp), PATCHES)


def _same_dir(a, b):
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    return names_a == names_b and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names_a)


def build(force=False):
    """Make .work/nova the base plus the series, unless it already is."""
    if TREE.exists() and not force:
        if tree_matches_series(TREE):
            log('work tree .work/nova already matches patches/')
            return
        raise HarnessError(
            '.work/nova has commits or changes that patches/ does not hold. '
            'Run tools/export to keep them, or tools/build --force to '
            'discard them.')
    log('materialising .work/nova from the base and %d patches' %
        len(series()))
    materialise(TREE)


def export():
    """Regenerate patches/ from .work/nova and sync the overlay."""
    if not (TREE / '.git').exists():
        raise HarnessError('no work tree: run tools/build first')
    dirty = git(TREE, 'status', '--porcelain').stdout.strip()
    if dirty:
        raise HarnessError('commit your changes in .work/nova first:\n' +
                           dirty)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        tmp = pathlib.Path(tmp)
        format_patches(TREE, tmp)
        for old in PATCHES.glob('*.patch'):
            old.unlink()
        for new in tmp.iterdir():
            shutil.copyfile(new, PATCHES / new.name)
    for top in OVERLAY:
        shutil.rmtree(REPO / top, ignore_errors=True)
    for rel in _overlay_files(TREE, tracked_in=TREE):
        (REPO / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TREE / rel, REPO / rel)
    # Remove now-empty parents (e.g. doc/source when devref went away).
    for top in OVERLAY:
        parent = (REPO / top).parent
        while parent != REPO and parent.exists() and not any(
                parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    log('exported %d patches and synced the overlay' % len(series()))


SIGNED = WORK / 'signed-series'


def _sign_patch(path, identity):
    """Make identity the author of the patch at path and add its DCO."""
    lines = path.read_text().split('\n')
    for number, line in enumerate(lines):
        if line.startswith('From: '):
            lines[number] = 'From: ' + identity
            break
        if not line:
            raise HarnessError('%s: no From: header' % path.name)
    path.write_text('\n'.join(lines))
    git(path.parent, 'interpret-trailers', '--in-place', '--where', 'end',
        '--if-exists', 'addIfDifferent',
        '--trailer', 'Signed-off-by: ' + identity, str(path))
    trailers = git(path.parent, 'interpret-trailers', '--parse',
                   str(path)).stdout.splitlines()
    if 'Signed-off-by: ' + identity not in trailers:
        raise HarnessError('%s: Signed-off-by was not added' % path.name)


def signed_export(identity, out_dir=SIGNED):
    """Write the series, authored and signed off by identity, to out_dir.

    patches/ stays as it is: only the person who submits the series can
    certify it (the DCO), so their name goes into a copy of it.
    """
    if not IDENTITY.match(identity):
        raise HarnessError('--signoff wants "Full Name <email>", not %r'
                           % identity)
    if not tree_matches_series(TREE):
        raise HarnessError('.work/nova differs from patches/: run '
                           'tools/export first')
    if out_dir.exists():
        shutil.rmtree(out_dir)
    format_patches(TREE, out_dir)
    for name in series_names(out_dir):
        _sign_patch(out_dir / name, identity)
    log('wrote %d patches signed off by %s to %s' % (
        len(series_names(out_dir)), identity, out_dir))


def series_names(directory):
    return (directory / 'series').read_text().split()


def check_series():
    """Apply the series to a fresh base, compare overlay, re-export.

    Returns a list of (check name, problem text or None).
    """
    results = []
    scratch = WORK / 'check-tree'
    try:
        materialise(scratch)
        results.append(('series applies exactly', None))
    except HarnessError as e:
        results.append(('series applies exactly', str(e)))
        return results
    problems = overlay_differences(scratch)
    results.append(('overlay in sync',
                    '\n'.join(problems) if problems else None))
    problems = series_message_problems(scratch)
    results.append(('commit messages follow nova\'s guide',
                    '\n'.join(problems) if problems else None))
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        format_patches(scratch, pathlib.Path(tmp))
        same = _same_dir(pathlib.Path(tmp), PATCHES)
    results.append(('export is deterministic', None if same else
                    'exporting the applied series changes patches/'))
    shutil.rmtree(scratch)
    return results
