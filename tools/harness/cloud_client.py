"""The REST client side of tools/cloud: openstacksdk on a noauth2 cloud.

nova-api and placement run with ``auth_strategy = noauth2``, which takes
the token ``user:project`` as is; ``admin:admin`` is an admin. keystoneauth's
token_endpoint plugin sends that token to a fixed endpoint, which is all
openstacksdk needs.
"""

import threading
import time

from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
import openstack.connection

TOKEN = 'admin:admin'
FLAVOR = {'name': 'cloud.tiny', 'ram': 64, 'vcpus': 1, 'disk': 1}


class Client(object):
    def __init__(self, api_url, placement_url, headers=None):
        """:param headers: sent with every request to nova-api."""
        self.api_url = api_url
        self.placement_url = placement_url
        self.headers = headers
        self._local = threading.local()
        self.placement = ks_session.Session(
            auth=token_endpoint.Token(placement_url, TOKEN))
        self.image_id = self.flavor_id = None

    @property
    def conn(self):
        """One openstacksdk connection per thread."""
        conn = getattr(self._local, 'conn', None)
        if conn is None:
            session = ks_session.Session(
                auth=token_endpoint.Token(self.api_url, TOKEN),
                additional_headers=self.headers)
            conn = openstack.connection.Connection(
                session=session,
                compute_endpoint_override=self.api_url + '/v2.1')
            self._local.conn = conn
        return conn

    def services_up(self):
        return {(s.binary, s.host) for s in self.conn.compute.services()
                if s.state == 'up' and s.status == 'enabled'}

    def hypervisors(self):
        return list(self.conn.compute.hypervisors())

    def setup(self, image_id):
        self.image_id = image_id
        flavor = self.conn.compute.find_flavor(FLAVOR['name'])
        if flavor is None:
            flavor = self.conn.compute.create_flavor(**FLAVOR)
        self.flavor_id = flavor.id

    def create_server(self, name, flavor_id=None, networks='none'):
        server = self.conn.compute.create_server(
            name=name, image_id=self.image_id,
            flavor_id=flavor_id or self.flavor_id, networks=networks)
        return {'id': server.id, 'name': name}

    def _server(self, server):
        return {'id': server.id, 'name': server.name,
                'status': server.status, 'host': server.compute_host}

    def wait_servers(self, ids, timeout, check=None):
        """Wait until no server is BUILD; return them in the order of ids."""
        deadline = time.monotonic() + timeout
        while True:
            if check:
                check()
            servers = {s.id: s for s in self.conn.compute.servers(
                details=True, all_projects=True) if s.id in ids}
            building = [i for i in ids if i not in servers or
                        servers[i].status == 'BUILD']
            if not building or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return [self._server(servers[i]) if i in servers else
                {'id': i, 'name': '?', 'status': 'MISSING', 'host': None}
                for i in ids]

    def delete_servers(self, ids, timeout):
        for uuid in ids:
            self.conn.compute.delete_server(uuid, ignore_missing=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [s for s in self.conn.compute.servers(all_projects=True)
                    if s.id in ids]
            if not left:
                return
            time.sleep(0.5)
        raise RuntimeError('servers not deleted after %d s' % timeout)

    def _placement(self, path):
        return self.placement.get(
            self.placement_url + path,
            headers={'OpenStack-API-Version': 'placement 1.28'}).json()

    def placement_consumers(self):
        """{consumer uuid: [provider uuid]} of every allocation."""
        consumers = {}
        for rp in self._placement('/resource_providers')[
                'resource_providers']:
            allocations = self._placement(
                '/resource_providers/%s/allocations' % rp['uuid'])
            for consumer in allocations['allocations']:
                consumers.setdefault(consumer, []).append(rp['uuid'])
        return consumers
