// Tells the window that opened the popup how the OAuth2 flow ended, then closes the popup.
// The message goes only to the configured origins (postMessage drops it for any other).
(function () {
  "use strict";
  var node = document.getElementById("broker-result");
  if (!node) return;
  var data = JSON.parse(node.textContent);
  var message = data.message;
  var delivered = false;
  if (window.opener && !window.opener.closed) {
    data.targets.forEach(function (origin) {
      try {
        window.opener.postMessage(message, origin);
        delivered = true;
      } catch (e) { /* a severed opener: fall through to the channel */ }
    });
  }
  // Same-origin fallback for pages whose opener was severed (Cross-Origin-Opener-Policy).
  try {
    var channel = new BroadcastChannel("broker:oauth");
    channel.postMessage(message);
    channel.close();
    delivered = true;
  } catch (e) { /* BroadcastChannel unsupported */ }
  if (window.opener && delivered) {
    window.setTimeout(function () { window.close(); }, 50);
  }
})();
