// Shared by the sign-in popup's pages: tell the window that opened the popup how the
// sign-in ended, then close the popup. The message goes only to the configured origins
// (postMessage drops it for any other), and on the broker's own BroadcastChannel for an
// opener that a provider's Cross-Origin-Opener-Policy cut off.
(function () {
  "use strict";
  window.brokerReport = function (message, targets) {
    var delivered = false;
    if (window.opener && !window.opener.closed) {
      targets.forEach(function (origin) {
        try {
          window.opener.postMessage(message, origin);
          delivered = true;
        } catch (e) { /* a severed opener: fall through to the channel */ }
      });
    }
    try {
      var channel = new BroadcastChannel("broker:oauth");
      channel.postMessage(message);
      channel.close();
      delivered = true;
    } catch (e) { /* BroadcastChannel unsupported */ }
    if (window.opener && delivered) {
      window.setTimeout(function () { window.close(); }, 50);
    }
  };
})();
