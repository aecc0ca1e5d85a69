"""Split a base->final diff of one file into hunks and apply subsets."""
import re, subprocess, sys

def hunks(repo, base, final, path, context=3):
    out = subprocess.run(['git', 'diff', '-U%d' % context, base, final, '--', path],
                         cwd=repo, capture_output=True, text=True, check=True).stdout
    result = []
    cur = None
    for line in out.splitlines(keepends=True):
        m = re.match(r'^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@', line)
        if m:
            cur = {'old_start': int(m.group(1)), 'old_len': int(m.group(2) or '1'),
                   'lines': [], 'head': line}
            result.append(cur)
        elif cur is not None and line[:1] in ' +-\\':
            cur['lines'].append(line)
    return result

def apply(base_text, hs):
    """Apply hunks hs (of a diff from base_text) to base_text."""
    lines = base_text.splitlines(keepends=True)
    for h in sorted(hs, key=lambda h: -h['old_start']):
        old = [l[1:] for l in h['lines'] if l[:1] in ' -']
        new = [l[1:] for l in h['lines'] if l[:1] in ' +']
        start = h['old_start'] - 1 if h['old_len'] else h['old_start']
        assert lines[start:start + len(old)] == old, (h['head'], start)
        lines[start:start + len(old)] = new
    return ''.join(lines)

if __name__ == '__main__':
    repo, base, final, path = sys.argv[1:5]
    ctx = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    for i, h in enumerate(hunks(repo, base, final, path, ctx)):
        print('#### HUNK %d %s' % (i, h['head'].strip()))
        print(''.join(h['lines']), end='')
