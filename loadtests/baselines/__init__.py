"""Reference targets for ``loadtests compare``, served behind the same nginx as Switchboard.

* ``tutorial/``: the seeds' tutorial setup -- a Django project with the tutorial's chat consumer,
  one daphne process, ``channels_redis.core.RedisChannelLayer`` with default settings.
* ``nodjango.py``: the no-Django upper bound -- a plain ``websockets`` server, one room
  subscription per process on Redis pub/sub, each frame encoded once per process.

``loadtests.targets`` starts either on free loopback ports with its own Redis and nginx.
"""
