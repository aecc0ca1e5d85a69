"""Serve nova-api or placement on a loopback port, for tools/cloud.

nova 34 ships its APIs as WSGI applications only (nova.wsgi.osapi_compute,
placement.wsgi.api); a threaded wsgiref server is enough for a cloud on
one machine. The configuration directory comes from the environment
(OS_NOVA_CONFIG_DIR, OS_PLACEMENT_CONFIG_DIR) as under any WSGI server.

    python cloud_wsgi.py nova|placement PORT
"""

import importlib
import socketserver
import sys
from wsgiref import simple_server

MODULES = {'nova': 'nova.wsgi.osapi_compute',
           'placement': 'placement.wsgi.api'}


def noauth_filter_factory(global_conf, **local_conf):
    """Paste filter: trust the token ``user:project`` as it is.

    nova 34 dropped ``[api] auth_strategy = noauth2``; this filter takes
    the place of keystonemiddleware's authtoken in the cloud's paste
    pipeline and sets the headers that nova's keystonecontext reads, as
    noauth2 did. The user ``admin`` is an admin.
    """
    def factory(app):
        def middleware(environ, start_response):
            token = environ.get('HTTP_X_AUTH_TOKEN')
            if not token:
                start_response('401 Unauthorized',
                               [('Content-Type', 'text/plain')])
                return [b'an X-Auth-Token user:project is required\n']
            user, _sep, project = token.partition(':')
            roles = ['reader', 'member'] + (['admin'] if user == 'admin'
                                            else [])
            environ.update({
                'HTTP_X_IDENTITY_STATUS': 'Confirmed',
                'HTTP_X_USER_ID': user, 'HTTP_X_USER_NAME': user,
                'HTTP_X_PROJECT_ID': project or user,
                'HTTP_X_PROJECT_NAME': project or user,
                'HTTP_X_ROLES': ','.join(roles)})
            return app(environ, start_response)
        return middleware
    return factory


class _Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class _Handler(simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write('wsgi %s\n' % (fmt % args))


def main():
    name, port = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0]]
    application = importlib.import_module(MODULES[name]).application
    server = simple_server.make_server('127.0.0.1', port, application,
                                       server_class=_Server,
                                       handler_class=_Handler)
    server.serve_forever()


if __name__ == '__main__':
    main()
