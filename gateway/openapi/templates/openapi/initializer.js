// The descriptions are the gateway's own; validatorUrl: null keeps Swagger UI from sending them elsewhere.
window.onload = function () {
  window.ui = SwaggerUIBundle({
    urls: {{ descriptions | tojson }},
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
  });
};
