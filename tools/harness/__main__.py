"""Command line entry: python3 -m harness COMMAND (see README.md)."""

import argparse
import pathlib
import sys

from harness import bench
from harness import cloud
from harness import env
from harness import testrun
from harness import tree


def main(argv=None):
    parser = argparse.ArgumentParser(prog='harness')
    sub = parser.add_subparsers(dest='command', required=True)
    build = sub.add_parser('build', help='materialise .work/nova')
    build.add_argument('--force', action='store_true',
                       help='discard unexported work in .work/nova')
    export = sub.add_parser('export',
                            help='regenerate patches/ and the overlay')
    export.add_argument('--signoff', metavar='"NAME <EMAIL>"',
                        help='instead: write the series authored and '
                        'signed off (DCO) by this person to --out, for '
                        'them to submit')
    export.add_argument('--out', metavar='DIR',
                        help='--signoff: where to write the series '
                        '(default .work/signed-series)')
    sub.add_parser('check', help='apply, overlay and determinism checks')
    sub.add_parser('setup', help='packages, databases, tree and venv')
    sub.add_parser('refresh-lock', help='re-resolve tools/constraints.txt')
    test = sub.add_parser('test', help='the README test command')
    mode = test.add_mutually_exclusive_group()
    mode.add_argument('--full', action='store_true',
                      help='slow: the entire unit and functional suites')
    mode.add_argument('--per-commit', action='store_true',
                      help='slow: hacking and touched tests per commit')
    test.add_argument('--from', dest='first', type=int, default=1,
                      metavar='N', help='--per-commit: start at patch N')
    mode.add_argument('--baseline', action='store_true',
                      help='record the selection on the unpatched base')
    mode.add_argument('--full-baseline', action='store_true',
                      help='record the entire suites on the unpatched base')
    bench_cmd = sub.add_parser('bench', help='benchmarks (see README.md)')
    bench_cmd.add_argument('what', choices=('engine', 'boot'),
                           help='engine: orchestration engine vs TaskFlow; '
                           'boot: servers booted on the base and the series')
    bench_cmd.add_argument('--rpc-poll-ms', type=float, metavar='MS',
                           help='boot: the fake RPC driver polls every MS '
                           'ms, in both trees, instead of delivering at '
                           'once (as runs before 2026-12 did)')
    bench_cmd.add_argument('--rounds', type=int, metavar='N',
                           help='boot: rounds of both trees, alternating '
                           'their order (default 5)')
    bench_cmd.add_argument('--instructions', action='store_true',
                           help='boot: count CPU instructions per boot '
                           'under valgrind instead of timing')
    bench_cmd.add_argument('--boots', type=int, metavar='N',
                           help='boot --instructions: boots counted in '
                           'each tree (default 8)')
    cloud_cmd = sub.add_parser('cloud', help='the main job: a local cloud '
                               'booting servers (see README.md)')
    cloud_cmd.add_argument('--real', action='store_true',
                           help='separate processes on RabbitMQ and '
                           'PostgreSQL or MariaDB; SIGKILL a conductor')
    cloud_cmd.add_argument('--count', type=int,
                           help='servers to boot (default: 6 with --real, '
                           '8 without)')
    cloud_cmd.add_argument('--db', choices=('postgresql', 'mysql'),
                           help='--real: the database server '
                           '(default: postgresql)')
    cloud_cmd.add_argument('--keep', action='store_true',
                           help='--real: keep the databases afterwards')
    chaos_cmd = sub.add_parser('chaos', help='SIGKILL conductors and '
                               'computes at every point of a build '
                               '(see README.md)')
    chaos_cmd.add_argument('--trials', type=int,
                           help='servers booted, one kill each (default '
                           '300; with --quick, one per point)')
    chaos_cmd.add_argument('--quick', action='store_true',
                           help='the short run of tools/test')
    chaos_cmd.add_argument('--seed', type=int,
                           help='order of the points and mid-stage delays')
    chaos_cmd.add_argument('--points', metavar='S/SVC/STAGE/PHASE,...',
                           help='only these points (as the JSON\'s '
                           'missed_points names them)')
    chaos_cmd.add_argument('--db', choices=('postgresql', 'mysql'))
    chaos_cmd.add_argument('--keep', action='store_true',
                           help='keep the databases afterwards')
    chaos_cmd.add_argument('--ports', action='store_true',
                           help='boot every server with a port')
    args = parser.parse_args(argv)
    try:
        if args.command == 'build':
            tree.build(force=args.force)
        elif args.command == 'export':
            if args.signoff:
                tree.signed_export(args.signoff, *(
                    [pathlib.Path(args.out).resolve()] if args.out else []))
            elif args.out:
                parser.error('--out goes with --signoff')
            else:
                tree.export()
        elif args.command == 'check':
            failed = 0
            for name, problem in tree.check_series():
                print('%s: %s' % ('FAIL' if problem else 'ok', name))
                if problem:
                    print(problem)
                    failed += 1
            return 1 if failed else 0
        elif args.command == 'setup':
            env.setup()
        elif args.command == 'refresh-lock':
            env.refresh_lock()
        elif args.command == 'cloud':
            return cloud.run(real=args.real, count=args.count, db=args.db,
                             keep=args.keep)
        elif args.command == 'chaos':
            return cloud.chaos(trials=args.trials, quick=args.quick,
                               db=args.db, seed=args.seed, keep=args.keep,
                               points=args.points, ports=args.ports)
        elif args.command == 'bench':
            if args.what == 'boot':
                return bench.boot(rpc_poll_ms=args.rpc_poll_ms,
                                  rounds=args.rounds,
                                  instructions=args.instructions,
                                  boots=args.boots)
            return bench.engine()
        elif args.command == 'test':
            if args.full:
                return testrun.full()
            if args.per_commit:
                return testrun.per_commit(first=args.first)
            if args.baseline or args.full_baseline:
                return testrun.baseline(full=args.full_baseline)
            return testrun.default()
    except tree.HarnessError as e:
        print('harness: error: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
