"""Beyond the database: application caches (Redis/Valkey, memcached) and connection poolers
(PgBouncer) on the same host, asked to give memory back before anything is killed and given it
back afterwards, exactly like a database's own caches.

Each kind is one module here (a protocol client and its adapter, behind caches.base.AppCache)
and one entry in caches/registry.py. They read and resize; what to do and when is decided in
policy/appcaches.py, and every change goes through act/.
"""
