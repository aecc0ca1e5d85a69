"""Read a tox environment's setenv and commands from nova's tox.ini.

The harness runs nova's suites exactly as ``tox -e ENV -- FILTER`` would,
minus the virtualenv management: same environment variables, same stestr
invocations, with ``{posargs}`` replaced by the harness's test filter.
"""

import configparser
import re
import shlex

_BRACES = re.compile(r'^(.*)\{([^{}]*)\}(.*)$')


def _expand(name):
    """Expand one tox factor group: 'functional{,-py311}' -> 2 names."""
    match = _BRACES.match(name)
    if not match:
        return [name]
    head, alts, tail = match.groups()
    return [head + alt.strip() + tail for alt in alts.split(',')]


class ToxEnv(object):
    def __init__(self, tox_ini, name):
        self.tox_ini = tox_ini
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        parser.read(tox_ini)
        self._parser = parser
        self.section = self._find(name)

    def _find(self, name):
        for section in self._parser.sections():
            if section.startswith('testenv:') and name in _expand(
                    section[len('testenv:'):]):
                return section
        raise KeyError('tox.ini has no [testenv:%s]' % name)

    def _get(self, key):
        for section in (self.section, 'testenv'):
            if self._parser.has_option(section, key):
                return self._parser.get(section, key)
        return ''

    def _lines(self, key):
        """Non-comment lines, with {[section]key} references inlined."""
        out = []
        for line in self._get(key).splitlines():
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            ref = re.match(r'^\{\[([^\]]+)\](\w+)\}$', line)
            if ref:
                section, option = ref.groups()
                for sub in self._parser.get(section, option).splitlines():
                    sub = sub.strip()
                    if sub and not sub.startswith('#'):
                        out.append(sub)
            else:
                out.append(line)
        return out

    def setenv(self):
        env = {}
        for line in self._lines('setenv'):
            key, _, value = line.partition('=')
            env[key.strip()] = value.strip()
        return env

    def commands(self, posargs):
        """The env's commands as argv lists, {posargs} substituted."""
        toxinidir = str(self.tox_ini.parent)
        result = []
        for line in self._lines('commands'):
            line = line.replace('{toxinidir}', toxinidir)
            argv = []
            for word in shlex.split(line):
                if word == '{posargs}':
                    argv.extend(posargs)
                else:
                    argv.append(word)
            result.append(argv)
        return result
