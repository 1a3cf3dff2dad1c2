// The page a `broker admin-link` URL opens. The link's one-time token is in the fragment
// (never sent to a server): it is taken off the address bar at once, posted from this
// origin, and the answer's cookie opens /admin.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("broker-enter").textContent);
  var message = document.getElementById("message");
  var token = window.location.hash.replace(/^#/, "");
  window.history.replaceState(null, "", window.location.pathname);
  if (!token) {
    message.textContent = data.refused;
    return;
  }
  fetch("/admin/enter", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: token }),
    credentials: "same-origin",
  }).then(function (response) {
    return response.json().then(function (body) { return { ok: response.ok, body: body }; });
  }).then(function (result) {
    if (result.ok) {
      window.location.replace("/admin");
    } else {
      var error = (result.body && result.body.error) || {};
      message.textContent = error.message || data.refused;
      document.querySelector("main").className = "result error";
    }
  }, function () {
    message.textContent = "Could not reach the server. Try the link again.";
  });
})();
