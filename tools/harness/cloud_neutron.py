"""A neutron stand-in that keeps ports, for tools/chaos --ports.

One shared network with one IPv4 subnet and a default security group;
ports are created, listed (filtered by the query's fields), shown,
updated and deleted as neutron does, in memory, so that tools/chaos can
count the ports a build leaves behind. Standard library only.

    python3 cloud_neutron.py PORT
"""

import http.server
import itertools
import json
import socketserver
import sys
import threading
import urllib.parse
import uuid

NETWORK_ID = '3b4a1c52-8f41-4a6e-9c1e-0d6c1f1b7a10'
SUBNET_ID = 'a1f0e0c4-6d2b-4f0a-9a51-5c3d3e1d2b20'
GROUP_ID = '5e0c7b1a-2f4d-4a3e-8b6c-9d1e2f3a4b30'
PROJECT = 'admin'
NETWORK = {'id': NETWORK_ID, 'name': 'chaos-net', 'tenant_id': PROJECT,
           'project_id': PROJECT, 'subnets': [SUBNET_ID], 'status': 'ACTIVE',
           'admin_state_up': True, 'shared': True, 'mtu': 1500,
           'port_security_enabled': True, 'router:external': False}
SUBNET = {'id': SUBNET_ID, 'name': 'chaos-subnet', 'network_id': NETWORK_ID,
          'tenant_id': PROJECT, 'project_id': PROJECT,
          'cidr': '10.0.0.0/16', 'ip_version': 4, 'gateway_ip': '10.0.0.1',
          'enable_dhcp': True, 'dns_nameservers': [], 'host_routes': [],
          'ipv6_address_mode': None, 'ipv6_ra_mode': None,
          'subnetpool_id': None}
GROUP = {'id': GROUP_ID, 'name': 'default', 'tenant_id': PROJECT,
         'project_id': PROJECT, 'security_group_rules': []}


class Neutron(object):
    def __init__(self):
        self.ports = {}
        self.lock = threading.Lock()
        self._addresses = itertools.count(2)

    @staticmethod
    def _matches(item, query):
        for key, wanted in query.items():
            if key in ('fields', 'limit', 'marker'):
                continue
            value = item.get(key)
            if isinstance(value, bool):
                value = str(value)
            if str(value) not in wanted and not (
                    isinstance(item.get(key), bool) and
                    str(item.get(key)).lower() in
                    [w.lower() for w in wanted]):
                return False
        return True

    def _new_port(self, spec):
        n = next(self._addresses)
        port = {
            'id': str(uuid.uuid4()), 'name': '', 'network_id': NETWORK_ID,
            'tenant_id': spec.get('tenant_id', PROJECT),
            'project_id': spec.get('tenant_id', PROJECT),
            'mac_address': 'fa:16:3e:%02x:%02x:%02x' % (
                n >> 16 & 255, n >> 8 & 255, n & 255),
            'fixed_ips': [{'subnet_id': SUBNET_ID,
                           'ip_address': '10.0.%d.%d' % (n // 250,
                                                         n % 250 + 2)}],
            'admin_state_up': True, 'status': 'DOWN', 'device_id': '',
            'device_owner': '', 'security_groups': [GROUP_ID],
            'binding:host_id': '', 'binding:vif_type': 'ovs',
            'binding:vnic_type': 'normal', 'binding:vif_details': {},
            'binding:profile': {}, 'port_security_enabled': True,
            'allowed_address_pairs': [], 'extra_dhcp_opts': [],
            'resource_request': None, 'dns_name': '',
        }
        port.update({k: v for k, v in spec.items() if k != 'fixed_ips'})
        return port

    def answer(self, method, path, query, body):
        parts = [p for p in path.split('/') if p]
        if not parts:
            return 200, {'versions': [{'id': 'v2.0', 'status': 'CURRENT',
                                       'links': []}]}
        parts = parts[1:] if parts[0] == 'v2.0' else parts
        name = parts[0].split('.')[0] if parts else ''
        ident = parts[1].split('.')[0] if len(parts) > 1 else None
        if name == 'networks':
            return self._collection('networks', [NETWORK], ident, query)
        if name == 'subnets':
            return self._collection('subnets', [SUBNET], ident, query)
        if name == 'security-groups':
            return self._collection('security_groups', [GROUP], ident,
                                    query)
        if name == 'quotas':
            return 200, {'quota': {'port': -1, 'network': -1}}
        if name == 'ports':
            return self._ports(method, ident, query, body)
        if name in ('extensions', 'floatingips', 'qos'):
            key = {'qos': 'policies'}.get(name, name)
            return 200, {key: []}
        return 404, {'NeutronError': {'message': 'not found: %s' % path}}

    def _collection(self, key, items, ident, query):
        if ident:
            for item in items:
                if item['id'] == ident:
                    return 200, {key[:-1]: item}
            return 404, {'NeutronError': {'message': '%s not found' % ident}}
        return 200, {key: [i for i in items if self._matches(i, query)]}

    def _ports(self, method, ident, query, body):
        with self.lock:
            if method == 'GET' and not ident:
                return 200, {'ports': [p for p in self.ports.values()
                                       if self._matches(p, query)]}
            if method == 'POST':
                port = self._new_port(body['port'])
                self.ports[port['id']] = port
                return 201, {'port': port}
            port = self.ports.get(ident)
            if port is None:
                return 404, {'NeutronError': {
                    'type': 'PortNotFound',
                    'message': 'Port %s could not be found.' % ident}}
            if method == 'PUT':
                port.update({k: v for k, v in body['port'].items()
                             if k != 'fixed_ips'})
                port['status'] = 'ACTIVE' if port['binding:host_id'] else (
                    'DOWN')
            elif method == 'DELETE':
                del self.ports[ident]
                return 204, None
            return 200, {'port': port}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args):
        sys.stderr.write('neutron %s\n' % (fmt % args))
        sys.stderr.flush()

    def _handle(self):
        length = int(self.headers.get('Content-Length') or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        status, reply = self.server.neutron.answer(
            self.command, url.path, query, body)
        data = json.dumps(reply).encode() if reply is not None else b''
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


def main():
    server = _Server(('127.0.0.1', int(sys.argv[1])), _Handler)
    server.neutron = Neutron()
    server.serve_forever()


if __name__ == '__main__':
    main()
