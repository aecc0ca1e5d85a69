"""Loopback stand-ins for glance and neutron, for tools/cloud.

The cloud boots servers with ``networks='none'`` from one image: nova-api
only reads that image from glance, and nova-compute only lists the
(absent) ports of a server from neutron when it deletes it. Each service
here answers those calls with canned JSON, standard library only.

    python3 cloud_stubs.py GLANCE_PORT NEUTRON_PORT
"""

import http.server
import json
import socketserver
import sys
import threading

IMAGE_ID = '155d900f-4e14-4e4c-a73d-069cbf4541e6'
IMAGE = {
    'id': IMAGE_ID, 'name': 'cloud-image', 'status': 'active',
    'visibility': 'public', 'protected': False, 'os_hidden': False,
    'container_format': 'bare', 'disk_format': 'raw', 'size': 1024,
    'virtual_size': 1024, 'min_disk': 0, 'min_ram': 0,
    'owner': 'admin', 'tags': [], 'checksum': None,
    'created_at': '2026-01-01T00:00:00Z',
    'updated_at': '2026-01-01T00:00:00Z',
    'file': '/v2/images/%s/file' % IMAGE_ID,
    'self': '/v2/images/%s' % IMAGE_ID, 'schema': '/v2/schemas/image',
}
# glanceclient builds its image model from this schema: it keeps the
# properties the schema lists.
IMAGE_SCHEMA = {'name': 'image',
                'properties': {key: {} for key in IMAGE},
                'additionalProperties': {'type': 'string'}, 'links': []}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args):
        sys.stderr.write('%s %s\n' % (self.server.name, fmt % args))
        sys.stderr.flush()

    def _reply(self, status, body=None):
        data = json.dumps(body).encode() if body is not None else b''
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drain(self):
        length = int(self.headers.get('Content-Length') or 0)
        if length:
            self.rfile.read(length)

    def do_GET(self):
        self._drain()
        status, body = self.server.answer(self.path.split('?')[0])
        self._reply(status, body)

    def do_DELETE(self):
        self._drain()
        self._reply(204)

    do_POST = do_PUT = do_GET


def _versions(port, version):
    return {'versions': [{
        'id': version, 'status': 'CURRENT',
        'links': [{'rel': 'self',
                   'href': 'http://127.0.0.1:%d/%s/' % (port, version)}]}]}


def glance(port, path):
    path = path.rstrip('/')
    if path in ('', '/versions'):
        return 300, _versions(port, 'v2')
    if path == '/v2/schemas/image':
        return 200, IMAGE_SCHEMA
    if path == '/v2/images/' + IMAGE_ID:
        return 200, IMAGE
    if path == '/v2/images':
        return 200, {'images': [IMAGE]}
    return 404, {'message': 'no such image'}


def neutron(port, path):
    path = path.rstrip('/')
    if path == '':
        return 200, _versions(port, 'v2.0')
    name = path.rsplit('/', 1)[-1].split('.')[0]
    if name in ('ports', 'networks', 'subnets', 'security-groups',
                'floatingips', 'extensions', 'qos/policies'):
        return 200, {name: []}
    return 404, {'NeutronError': {'message': 'not found: %s' % path}}


def serve(name, port, answer):
    server = _Server(('127.0.0.1', port), _Handler)
    server.name = name
    server.answer = lambda path: answer(port, path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def main():
    glance_port, neutron_port = int(sys.argv[1]), int(sys.argv[2])
    threads = [serve('glance', glance_port, glance),
               serve('neutron', neutron_port, neutron)]
    for thread in threads:
        thread.join()


if __name__ == '__main__':
    main()
