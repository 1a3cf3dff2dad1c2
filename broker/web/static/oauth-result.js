// The page a sign-in popup ends on: reports the outcome to the window that opened it.
(function () {
  "use strict";
  var node = document.getElementById("broker-result");
  if (!node) return;
  var data = JSON.parse(node.textContent);
  window.brokerReport(data.message, data.targets);
})();
