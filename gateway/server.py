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
        "worker_class": "gthread",  # threads keep connections alive; workers use the cores
        "threads": 4,
        "control_socket_disable": True,  # one per machine user: two gateways would share it
    }
    _GatewayServer(app, options).run()
