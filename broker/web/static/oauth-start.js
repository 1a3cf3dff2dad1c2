// The page a sign-in popup opens on. It carries nothing: the window that opened it (the
// connect page, or a host app on an allowed origin) hands it the flow's single-use ticket
// by postMessage; it redeems the ticket from the broker's own origin and goes on to the
// provider. Opened from a link, it has no opener to ask, and nothing happens.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("broker-start").textContent);
  var message = document.getElementById("message");
  var title = document.getElementById("title");
  var done = false;

  function fail(text, integration) {
    done = true;
    title.textContent = "Could not connect";
    message.textContent = text;
    document.querySelector("main").className = "result error";
    window.brokerReport(
      { type: "broker:oauth", integration: integration || null, status: "error", error: text },
      data.targets
    );
  }

  if (!window.opener || window.opener === window) {
    title.textContent = "Nothing to do here";
    message.textContent = "Sign-ins start from the app, not from a link. Close this window and start again from the app.";
    return;
  }

  function redeem(ticket) {
    message.textContent = "Taking you to sign in…";
    fetch("/oauth/start", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ticket: ticket }),
      credentials: "same-origin",
    }).then(function (response) {
      return response.json().then(function (body) { return { ok: response.ok, body: body }; });
    }).then(function (result) {
      if (result.ok && result.body && typeof result.body.location === "string") {
        window.location.replace(result.body.location);
      } else {
        var error = (result.body && result.body.error) || {};
        fail(error.message || "This sign-in could not start. Start again from the app.", error.integration);
      }
    }, function () {
      fail("Could not reach the server. Close this window and try again.");
    });
  }

  window.addEventListener("message", function (event) {
    // Only the window that opened this one, on the broker's origin or an allowed one.
    if (done || event.source !== window.opener || data.targets.indexOf(event.origin) < 0) return;
    var msg = event.data;
    if (!msg || msg.type !== "broker:start" || typeof msg.ticket !== "string") return;
    done = true;
    redeem(msg.ticket);
  });

  // Ask until answered: the opener may not be listening yet. Each ask goes only to the
  // allowed origins (postMessage drops it for an opener on any other).
  var asked = 0;
  function ask() {
    if (done) return;
    if (!window.opener || window.opener.closed || ++asked > 40) {
      fail("The app did not start this sign-in. Close this window and start again from the app.");
      return;
    }
    data.targets.forEach(function (origin) {
      try { window.opener.postMessage({ type: "broker:start-ready" }, origin); } catch (e) { /* gone */ }
    });
    window.setTimeout(ask, 250);
  }
  ask();
})();
