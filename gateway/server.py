"""Running the app under gunicorn from `gateway serve`."""
from gunicorn.app.base import BaseApplication


class _GatewayServer(BaseApplication):
    def __init__(self, app, options):
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self):
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        return self._app


def serve(app, bind, workers):
    options = {
        "bind": bind,
        "workers": workers,
        # sync workers: every request is a new connection, so the kernel spreads the load over the
        # workers; threaded workers keep a client's connection on one worker, and a few busy clients
        # can leave the other worker (and core) idle (bench/archive_v1.py --worker-args shows each
        # worker's CPU under either)
        "worker_class": "sync",
        "control_socket_disable": True,  # one per machine user: two gateways would share it
    }
    _GatewayServer(app, options).run()
