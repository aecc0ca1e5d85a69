"""Per-server stage timelines and totals, shared by both tools/cloud modes.

Reads the API database tables of the orchestration series
(orchestration_flows, orchestration_stages) through a SQLAlchemy engine
and prints, for each server, every stage execution of its flows: when it
started relative to the moment nova-api stored the server's first flow,
how long it ran, which conductor ran it and how it ended.

SQLAlchemy is imported by the functions that query (they run with the
python of .work/venv); the printing is standard library only.
"""

import datetime
import statistics

_FLOWS = ('SELECT id, uuid, kind, instance_uuid, state, owner, created_at '
          'FROM orchestration_flows WHERE instance_uuid IN :uuids '
          'ORDER BY created_at, id')
_STAGES = ('SELECT flow_id, position, attempt, name, state, owner, '
           'started_at, finished_at FROM orchestration_stages '
           'WHERE flow_id IN :ids '
           'ORDER BY flow_id, started_at, position, attempt')
_BUILDS = ('SELECT a.instance_uuid, e.start_time, e.finish_time, e.result, '
           'e.host FROM instance_actions a JOIN instance_actions_events e '
           'ON e.action_id = a.id WHERE a.instance_uuid IN :uuids AND '
           "e.event = 'compute__do_build_and_run_instance' "
           'ORDER BY e.start_time')


def _query(sql, name):
    import sqlalchemy as sa
    return sa.text(sql).bindparams(sa.bindparam(name, expanding=True))


def host_of(owner):
    """The host part of an engine owner (host:pid:tag)."""
    return (owner or '-').split(':')[0]


def load(engine, instance_uuids):
    """{instance uuid: [flow dict with its 'stages']} from the API DB."""
    flows = {uuid: [] for uuid in instance_uuids}
    if not instance_uuids:
        return flows
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(
            _query(_FLOWS, 'uuids'), {'uuids': list(instance_uuids)})]
        by_id = {}
        for row in rows:
            row['stages'] = []
            by_id[row['id']] = row
            flows[row['instance_uuid']].append(row)
        if by_id:
            for stage in conn.execute(_query(_STAGES, 'ids'),
                                      {'ids': list(by_id)}):
                by_id[stage.flow_id]['stages'].append(dict(stage._mapping))
    return flows


def compute_builds(engine, instance_uuids):
    """{instance uuid: [build event]} from a cell database.

    Each build of a server on a host is the instance action event
    compute__do_build_and_run_instance (microsecond timestamps, unlike
    the launched_at the REST API shows).
    """
    query = _query(_BUILDS, 'uuids')
    builds = {uuid: [] for uuid in instance_uuids}
    with engine.connect() as conn:
        for row in conn.execute(query, {'uuids': list(instance_uuids)}):
            builds[row.instance_uuid].append(dict(row._mapping))
    return builds


def _datetime(value):
    # A textual query on SQLite returns the stored text.
    if isinstance(value, str):
        return datetime.datetime.fromisoformat(value)
    return value


def _ms(start, end):
    if start is None or end is None:
        return None
    return (_datetime(end) - _datetime(start)).total_seconds() * 1000


def _fmt(value):
    return '%7.0f' % value if value is not None else '      -'


def takeovers(flows):
    """[(flow, first owner, last owner)] of flows run by two conductors."""
    found = []
    for flow in flows:
        hosts = []
        for stage in flow['stages']:
            host = host_of(stage['owner'])
            if not hosts or hosts[-1] != host:
                hosts.append(host)
        if len(hosts) > 1:
            found.append((flow, hosts[0], hosts[-1]))
    return found


def report(servers, flows, out=print):
    """Print each server's timeline, then the totals; return the totals.

    :param servers: [{'id', 'name', 'status', 'host', 'builds'}], builds
        as compute_builds() returns them.
    :param flows: what load() returned for these servers.
    """
    def emit(line, _out=out):
        _out(line.rstrip())

    out = emit
    per_stage = {}
    to_active = []
    for server in servers:
        its = flows.get(server['id'], [])
        out('server %s %s: %s on %s' % (
            server['name'], server['id'], server['status'],
            server['host'] or '-'))
        if not its:
            out('  (no orchestration flow)')
            continue
        origin = its[0]['created_at']
        out('  %7s %7s  %-15s %-21s %-8s %-20s' % (
            'at ms', 'ms', 'flow', 'stage', 'state', 'conductor'))
        for flow in its:
            out('  %s %7s  %-15s %-21s %-8s %-20s' % (
                _fmt(_ms(origin, flow['created_at'])), '',
                flow['kind'], '(flow stored)', flow['state'],
                host_of(flow['owner'])))
            stages = flow['stages']
            for i, stage in enumerate(stages):
                took = _ms(stage['started_at'], stage['finished_at'])
                conductor = host_of(stage['owner'])
                after = (host_of(stages[i + 1]['owner'])
                         if i + 1 < len(stages) else None)
                if after and after != conductor:
                    # The next stage row is written by whoever recorded
                    # this one's outcome: the stage was re-run there.
                    conductor += ' > ' + after
                name = stage['name'] + (
                    ' #%d' % stage['attempt'] if stage['attempt'] > 1
                    else '')
                out('  %s %s  %-15s %-21s %-8s %-20s' % (
                    _fmt(_ms(origin, stage['started_at'])), _fmt(took),
                    '', name, stage['state'], conductor))
                if took is not None:
                    per_stage.setdefault(stage['name'], []).append(took)
        for build in server.get('builds', ()):
            out('  %s %s  %-15s %-21s %-8s %-20s' % (
                _fmt(_ms(origin, build['start_time'])),
                _fmt(_ms(build['start_time'], build['finish_time'])),
                'compute', 'build-and-run', build['result'] or 'RUNNING',
                build['host']))
            took = _ms(build['start_time'], build['finish_time'])
            if took is not None:
                per_stage.setdefault('build-and-run', []).append(took)
            if build['result'] == 'Success':
                to_active.append(_ms(origin, build['finish_time']))
        for flow, first, last in takeovers(its):
            out('  %s flow taken over: %s -> %s' % (flow['kind'], first,
                                                    last))
    out('')
    out('totals: %d servers, %s' % (len(servers), ', '.join(
        '%d %s' % (n, status) for status, n in sorted(_count(
            s['status'] for s in servers).items()))))
    out('  %-21s %6s %9s %9s %9s' % ('stage', 'runs', 'median ms', 'max ms',
                                     'sum ms'))
    for name, values in per_stage.items():
        out('  %-21s %6d %9.0f %9.0f %9.0f' % (
            name, len(values), statistics.median(values), max(values),
            sum(values)))
    if to_active:
        out('  %-21s %6d %9.0f %9.0f' % ('stored -> ACTIVE', len(to_active),
                                         statistics.median(to_active),
                                         max(to_active)))
    all_flows = [f for its in flows.values() for f in its]
    taken = takeovers(all_flows)
    out('  flows: %d (%s); taken over by another conductor: %d' % (
        len(all_flows), ', '.join('%d %s' % (n, state) for state, n in sorted(
            _count(f['state'] for f in all_flows).items())), len(taken)))
    return {'flows': all_flows, 'takeovers': taken, 'per_stage': per_stage}


def _count(values):
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def report_and_check(servers, flows, builds, problems):
    """Print the timelines and totals of servers; add what went wrong.

    Every server must be ACTIVE and every flow SUCCESS. Returns the
    totals of report().
    """
    for server in servers:
        server['builds'] = builds[server['id']]
    print()
    totals = report(servers, flows)
    print()
    for server in servers:
        if server['status'] != 'ACTIVE':
            problems.append('%s is %s' % (server['name'], server['status']))
    unfinished = [f for f in totals['flows'] if f['state'] != 'SUCCESS']
    if unfinished:
        problems.append('%d flows did not succeed' % len(unfinished))
    return totals
