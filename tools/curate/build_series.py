"""Rebuild the series as curated patches from the final tree.

python3 build_series.py REPO FINAL_REF [BRANCH]

Each patch is a set of files taken whole from FINAL_REF, plus files in a
partial state computed here or given by hand under stage/NN/ beside
this script.
"""
import os
import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import hunks as H  # noqa

REPO = pathlib.Path(sys.argv[1])
FINAL = sys.argv[2]
BRANCH = sys.argv[3] if len(sys.argv) > 3 else 'series'
MSGS = pathlib.Path(__file__).parent / 'messages'
STAGE = pathlib.Path(__file__).parent / 'stage'
O = 'nova/orchestration/'
T = 'nova/tests/orchestration/'
RN = 'releasenotes/notes/'


def git(*args, **kw):
    return subprocess.run(['git'] + list(args), cwd=REPO, check=True,
                          capture_output=True, text=True, **kw).stdout


def final(path):
    return git('show', '%s:%s' % (FINAL, path))


def base(path):
    return git('show', 'base:%s' % path)


def final_files(prefix):
    return [p for p in git('ls-tree', '-r', '--name-only', FINAL, '--',
                           prefix).split()]


def reno(stem):
    names = [p for p in final_files(RN) if os.path.basename(p).startswith(
        stem + '-')]
    assert len(names) == 1, (stem, names)
    return names[0]


def sub(text, old, new, count=1):
    assert old in text, old[:200]
    return text.replace(old, new, count)


def remove_classes(text, names):
    for name in names:
        m = re.search(r'\n\n\nclass %s\b.*?(?=\n\n\nclass |\Z)' % name, text,
                      re.S)
        assert m, name
        text = text[:m.start()] + text[m.end():]
        if not text.endswith('\n'):
            text += '\n'
    return text


def remove_opts(text, names):
    for name in names:
        m = re.search(r"\n    cfg\.\w+\(\n        '%s',.*?(?=\n    cfg\.|\n\])"
                      % name, text, re.S)
        assert m, name
        text = text[:m.start()] + text[m.end():]
    return text


def remove_method(text, name):
    m = re.search(r'\n\n    def %s\(.*?(?=\n\n    def |\n\n\nclass |\Z)' %
                  name, text, re.S)
    assert m, name
    text = text[:m.start()] + text[m.end():]
    return text if text.endswith('\n') else text + '\n'


def hunks_applied(path, indexes, context=2, target=None):
    target = target or FINAL
    hs = H.hunks(str(REPO), 'base', target, path, context)
    return H.apply(base(path), [hs[i] for i in indexes])


# -- partial states ---------------------------------------------------------

EXC = 'nova/exception.py'
EXC_LATER = {2: ['OrchestrationEngineStopped', 'BuildEnded',
                 'BuildNotUndone', 'HostGaveNoOutcome', 'BuildHostDown'],
             4: ['BuildEnded', 'BuildNotUndone', 'HostGaveNoOutcome',
                 'BuildHostDown']}


def exception_at(n):
    return remove_classes(final(EXC), EXC_LATER[n])


CONF = 'nova/conf/orchestration.py'
CONF_LATER = {4: ['sweep_interval', 'retention_days', 'host_restart_timeout',
                  'credential_keys'],
              7: ['host_restart_timeout', 'credential_keys'],
              8: ['host_restart_timeout']}


def conf_at(n):
    return remove_opts(final(CONF), CONF_LATER[n])


TOX = 'tox.ini'
CM = 'nova/conductor/manager.py'
TC = 'nova/tests/unit/conductor/test_conductor.py'
WAITING_INIT = """
        # Compute hosts found new enough to build while the conductor
        # waits (see BuildOnHost): a service's version does not go down.
        self.waiting_build_hosts = set()"""
WAITING_RESET = """
        self.compute_rpcapi = compute_rpcapi.ComputeAPI()
        self.waiting_build_hosts = set()"""
BUILD_IMPORT = 'from nova.orchestration.flows import boot as build_flows\n'


def conductor_at(n):
    text = final(CM)
    text = sub(text, WAITING_INIT, '')
    text = sub(text, WAITING_RESET,
               '\n        self.compute_rpcapi = compute_rpcapi.ComputeAPI()')
    # 7: everything but the switch-over of schedule_and_build_instances.
    blob = git('hash-object', '-w', '--stdin', input=text).strip()
    diff = subprocess.run(['git', 'diff', '-U2', 'base:' + CM, blob],
                          cwd=REPO, capture_output=True, text=True).stdout
    hs = parse_hunks(diff)
    keep = [h for h in hs if 'def _create_and_bind_arqs' not in h['head']
            and 'build-request flow' not in ''.join(h['lines'])]
    assert len(keep) == len(hs) - 1, [h['head'] for h in hs]
    text = H.apply(base(CM), keep)
    text = sub(text, BUILD_IMPORT, '')
    text = sub(text, 'from nova.network import neutron\n',
               'from nova.network import neutron\n'
               'from nova import notifications\n')
    return text


def parse_hunks(diff):
    result, cur = [], None
    for line in diff.splitlines(keepends=True):
        m = re.match(r'^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@', line)
        if m:
            cur = {'old_start': int(m.group(1)),
                   'old_len': int(m.group(2) or '1'), 'lines': [],
                   'head': line}
            result.append(cur)
        elif cur is not None and line[:1] in ' +-\\':
            cur['lines'].append(line)
    return result


def test_conductor_at(n):
    hs = H.hunks(str(REPO), 'base', FINAL, TC, 2)
    assert len(hs) == 18, len(hs)
    text = H.apply(base(TC), [hs[i] for i in (0, 1, 2, 17)])
    for line in TC7_DROP_IMPORTS:
        text = sub(text, line, '')
    return text


TC7_DROP_IMPORTS = [BUILD_IMPORT]

CRED_TEST = T + 'unit/test_credentials.py'


def credentials_test_at(n):
    text = remove_method(final(CRED_TEST),
                         'test_context_record_holds_the_token_only_sealed')
    text = sub(text, 'from nova.orchestration.flows.boot import common as build_common\n', '')
    return text


DEVREF_INDEX = 'doc/source/devref/index.rst'


def devref_index_at(n):
    text = final(DEVREF_INDEX)
    text = sub(text, '   overview\n', '')
    return sub(text, '   porting-move-operations\n', '')


def tox_at(n):
    return hunks_applied(TOX, [0, 1])


BF_TEST = T + 'unit/test_build_flow.py'


def staged(n):
    """Files given by hand for patch n: {path: text}."""
    root = STAGE / ('%02d' % n)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_text()
            for p in root.rglob('*') if p.is_file()}


CMGR = 'nova/compute/manager.py'
TCMGR = 'nova/tests/unit/compute/test_compute_mgr.py'
# What patch 17 adds to the files of patch 10: (path, markers, hunks).
UNSAVED_GUEST = ((CMGR, ('_destroy_unsaved_guest', 'Failed to save the '
                         'spawned'), 2),
                 (TCMGR, ('save_after_spawn',), 1))


def without_unsaved_guest(path):
    """Patch 10's state of path: the final one without patch 17's hunks."""
    markers, count = {p: (m, c) for p, m, c in UNSAVED_GUEST}[path]
    hs = H.hunks(str(REPO), 'base', FINAL, path, 2)
    later = [h for h in hs if any(m in ''.join(h['lines']) for m in markers)]
    assert len(later) == count, (path, len(later))
    assert all(line[:1] in ' +' for h in later for line in h['lines'])
    return H.apply(base(path), [h for h in hs if h not in later])


# -- the series ---------------------------------------------------------------

def flows_package():
    return final_files(O + 'flows/')


def engine_modules():
    names = set(final_files(O)) - set(flows_package())
    return sorted(n for n in names if n not in (
        O + '__init__.py', O + 'persistence.py', O + 'states.py',
        O + 'task.py', O + 'credentials.py'))


OBJ_TEST = 'nova/tests/unit/objects/test_objects.py'


def object_hashes_at(n):
    """The object hashes before patch 10 bumps Instance to 2.9."""
    return sub(final(OBJ_TEST),
               "'Instance': '2.9-0aaf9bef62ed821eca794092b6a11d4a'",
               "'Instance': '2.8-2727dba5e4a078e6cc848c1f94f7eb24'")


SERIES = [
    (1, ['nova/db/api/migrations/versions/'
         'd870f99f3ea9_add_orchestration_tables.py',
         'nova/db/api/models.py', 'nova/tests/unit/db/api/test_migrations.py'],
     {}),
    (2, [O + '__init__.py', O + 'persistence.py', O + 'states.py',
         T + '__init__.py', T + 'unit/__init__.py', T + 'unit/helpers.py',
         T + 'unit/test_persistence.py'],
     {EXC: lambda: exception_at(2), TOX: lambda: tox_at(2)}),
    (3, [O + 'task.py', T + 'unit/test_task.py'], {}),
    (4, lambda: engine_modules() + [
        T + 'unit/test_engine.py', 'nova/conf/__init__.py',
        'nova/thread_pool_factory.py', reno('orchestration-engine')],
     {EXC: lambda: exception_at(4), CONF: lambda: conf_at(4)}),
    (5, lambda: final_files(T + 'functional/__init__.py') + [
        T + 'functional/' + n for n in (
            'base.py', 'worker.py', 'test_crash.py', 'test_race.py',
            'test_db_drop.py')] + [TOX], {}),
    (6, ['nova/objects/__init__.py', 'nova/objects/orchestration.py',
         T + 'unit/test_objects.py'],
     {OBJ_TEST: lambda: object_hashes_at(6)}),
    (7, lambda: [reno('orchestration-conductor-sweep'),
                 reno('orchestration-purge-finished-flows')],
     {CM: lambda: conductor_at(7), TC: lambda: test_conductor_at(7),
      CONF: lambda: conf_at(7)}),
    (8, [O + 'credentials.py'],
     {CRED_TEST: lambda: credentials_test_at(8), CONF: lambda: conf_at(8)}),
    (9, ['doc/source/devref/orchestration.rst',
         'doc/source/devref/build-flow.rst', 'doc/source/index.rst'],
     {DEVREF_INDEX: lambda: devref_index_at(9)}),
    (10, ['nova/compute/rpcapi.py',
          'nova/objects/service.py', 'nova/compute/build_results.py',
          'nova/tests/unit/compute/test_rpcapi.py',
          'nova/objects/instance.py', 'nova/db/main/api.py',
          'nova/tests/unit/objects/test_instance.py',
          'nova/tests/unit/db/main/test_api.py', OBJ_TEST],
     {CMGR: lambda: without_unsaved_guest(CMGR),
      TCMGR: lambda: without_unsaved_guest(TCMGR)}),
    (11, lambda: flows_package() + [
        BF_TEST, CRED_TEST, EXC, CONF, CM, TC,
        reno('orchestrated-build-request'),
        reno('orchestration-credential-keys'),
        reno('orchestration-resumed-build-token'),
        reno('build-flow-waits-for-the-host'), reno('build-stage-events'),
        reno('orchestration-compute-restart'),
        reno('orchestration-conductor-stop-hands-flows-over')], {}),
    (12, lambda: ['nova/compute/api.py', reno('build-request-flow-in-api')],
     {}),
    (13, [T + 'functional/test_build.py'], {}),
    (14, [T + 'functional/test_build_crash.py',
          T + 'functional/test_build_compute_crash.py',
          T + 'functional/test_build_credentials.py'], {}),
    (15, lambda: ['nova/cmd/manage.py', T + 'unit/test_manage.py',
                  T + 'functional/test_build_abort.py',
                  'doc/source/cli/nova-manage.rst',
                  reno('orchestration-nova-manage'),
                  reno('orchestration-abort-build')], {}),
    (16, ['doc/source/devref/overview.rst',
          'doc/source/devref/porting-move-operations.rst', DEVREF_INDEX,
          'doc/source/admin/orchestrated-builds.rst',
          'doc/source/admin/index.rst'], {}),
    (17, [CMGR, TCMGR, T + 'functional/test_build_save_failure.py',
          reno('destroy-guest-of-unsaved-spawn')], {}),
]


def write(path, text):
    full = REPO / path
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(text)
    git('add', path)


def main():
    git('checkout', '-q', '-B', BRANCH, 'base')
    env = dict(os.environ,
               GIT_AUTHOR_NAME='nova orchestration team',
               GIT_AUTHOR_EMAIL='orchestration@nova.invalid',
               GIT_COMMITTER_NAME='nova orchestration series',
               GIT_COMMITTER_EMAIL='series@nova.invalid')
    for n, whole, partial in SERIES:
        whole = whole() if callable(whole) else whole
        for path in whole:
            write(path, final(path))
        for path, make in partial.items():
            write(path, make())
        for path, text in staged(n).items():
            write(path, text)
        date = '2026-12-06T%02d:00:00Z' % n
        env.update(GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
        subprocess.run(['git', 'commit', '-q', '-F', str(MSGS / ('%02d' % n))],
                       cwd=REPO, env=env, check=True)
    diff = git('diff', '--stat', FINAL, 'HEAD')
    print('difference from %s:\n%s' % (FINAL, diff or '(none)'))


if __name__ == '__main__':
    main()
