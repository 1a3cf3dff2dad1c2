// The connect page. Plain JavaScript, no build step, no network beyond the broker.
// Gets its connect session (from the host app by postMessage, or from its link), lists the
// session's integrations through the API (the session is the bearer token), and connects,
// reconnects and disconnects them. Opened from a link, it names the workspace and asks
// before connecting anything to it: anyone can send anyone a link.
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("broker-connect").textContent);
  var STORE = "broker:connect-session";
  var session = ""; // the bearer token
  var fromLink = false; // true: every connect asks the person to confirm the workspace
  var workspace = ""; // the workspace's name (or its group id)
  var groupId = "";
  var list = document.getElementById("integrations");
  var statusLine = document.getElementById("status");
  var popups = {}; // integration -> {window, timer, done, ticket, ready, sent}

  var LABELS = {
    connected: "Connected",
    not_connected: "Not connected",
    reauth_required: "Needs reauth",
    unavailable: "Unavailable",
  };

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined || value === false) return;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value === true ? "" : value);
    });
    (children || []).forEach(function (child) {
      if (child) node.appendChild(child);
    });
    return node;
  }

  function say(message, kind) {
    statusLine.hidden = !message;
    statusLine.textContent = message || "";
    statusLine.className = "notice" + (kind ? " " + kind : "");
  }

  function api(method, path, body) {
    var init = { method: method, headers: { Authorization: "Bearer " + session } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (response) {
      return response.text().then(function (text) {
        var json = null;
        try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
        return { ok: response.ok, status: response.status, body: json };
      });
    });
  }

  // Tell an embedding host page (iframe parent or popup opener) what changed.
  function notifyHost(integration, status) {
    var message = { type: "broker:connect", integration: integration, status: status };
    var targets = [];
    if (window.parent && window.parent !== window) targets.push(window.parent);
    if (window.opener && !window.opener.closed) targets.push(window.opener);
    targets.forEach(function (target) {
      data.allowed_origins.forEach(function (origin) {
        try { target.postMessage(message, origin); } catch (e) { /* not that origin */ }
      });
    });
  }

  function initials(name) {
    var words = name.replace(/[^A-Za-z0-9 ]/g, " ").trim().split(/\s+/);
    var text = words.length > 1 ? words[0][0] + words[1][0] : (words[0] || "?").slice(0, 2);
    return text.toUpperCase();
  }

  function logo(item) {
    if (item.image) {
      return el("img", { className: "logo", src: item.image, alt: "", width: 40, height: 40 });
    }
    return el("span", { className: "logo initials", "aria-hidden": "true", text: initials(item.display_name) });
  }

  // The server's pattern (Python syntax), compiled for the browser when it can be ("u"
  // flag); when it cannot, only the server checks it.
  function compilePattern(pattern) {
    if (!pattern) return null;
    try {
      return new RegExp("^(?:" + pattern.replace(/^\^/, "").replace(/\$$/, "") + ")$", "u");
    } catch (e) {
      return null;
    }
  }

  // Required and pattern checks, shown beside each field. True when all fields pass.
  function checkFields(form, specs) {
    var firstBad = null;
    form.querySelectorAll("input, textarea").forEach(function (input) {
      var spec = specs[input.name] || {};
      var value = input.value.trim();
      var message = "";
      if (!value && spec.required !== false) message = spec.title + " is required.";
      else if (value) {
        var re = compilePattern(spec.pattern);
        if (re && !re.test(value)) {
          message = spec.title + " does not look right" + (spec.example ? " (like " + spec.example + ")." : ".");
        }
      }
      if (message) {
        input.setAttribute("aria-invalid", "true");
        document.getElementById(input.id + "-error").textContent = message;
        if (!firstBad) firstBad = input;
      }
    });
    if (firstBad) firstBad.focus();
    return firstBad === null;
  }

  function fieldInput(item, name, spec, prefix) {
    var id = prefix + "-" + item.name + "-" + name;
    // A JSON document (a service account's key file) is pasted into a text area.
    var input = spec.format === "json" ? el("textarea", {
      id: id,
      name: name,
      rows: 6,
      autocomplete: "off",
      spellcheck: "false",
      "aria-required": spec.required !== false ? "true" : null,
      placeholder: spec.example || null,
      "aria-describedby": id + "-error",
    }) : el("input", {
      id: id,
      name: name,
      type: spec.secret ? "password" : "text",
      autocomplete: spec.secret ? "new-password" : "off",
      spellcheck: "false",
      "aria-required": spec.required !== false ? "true" : null,
      placeholder: spec.example || null,
      value: spec.default || null,
      "aria-describedby": id + "-error",
    });
    var error = el("p", { className: "field-error", id: id + "-error", "aria-live": "polite" });
    return el("div", { className: "field" }, [
      el("label", { for: id, text: spec.title + (spec.required === false ? " (optional)" : "") }),
      input,
      error,
    ]);
  }

  function clearErrors(form) {
    form.querySelectorAll(".field-error").forEach(function (p) { p.textContent = ""; });
    form.querySelectorAll("input, textarea").forEach(function (i) { i.removeAttribute("aria-invalid"); });
  }

  function showErrors(form, error) {
    var problems = error.errors || (error.field ? [{ field: error.field, message: error.message }] : []);
    var shown = false;
    problems.forEach(function (problem) {
      var input = form.querySelector('[name="' + CSS.escape(problem.field) + '"]');
      if (!input) return;
      input.setAttribute("aria-invalid", "true");
      document.getElementById(input.id + "-error").textContent = problem.message;
      if (!shown) input.focus();
      shown = true;
    });
    if (!shown) say(error.message, "error");
  }

  function credentialForm(item) {
    var form = el("form", { className: "connect-form", novalidate: true, "aria-label": "Connect " + item.display_name });
    Object.keys(item.fields || {}).forEach(function (name) {
      form.appendChild(fieldInput(item, name, item.fields[name], "field"));
    });
    var label = item.status === "not_connected" ? "Connect" : "Replace";
    form.appendChild(el("button", { type: "submit", className: "primary", text: label }));
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      clearErrors(form);
      if (!checkFields(form, item.fields || {})) return;
      confirmThen(form, item, function () { submitCredential(form, item); });
    });
    return form;
  }

  function submitCredential(form, item) {
    var button = form.querySelector("button[type=submit]");
    button.disabled = true;
    say("Connecting " + item.display_name + "…");
    api("POST", item.config.trigger, formValues(form)).then(function (result) {
      button.disabled = false;
      if (result.ok) {
        finished(item, "connected");
      } else if (result.body && result.body.error) {
        say("");
        showErrors(form, result.body.error);
      } else {
        say("Could not connect " + item.display_name + " (HTTP " + result.status + ").", "error");
      }
    }, function () {
      button.disabled = false;
      say("Could not reach the server. Check your connection and try again.", "error");
    });
  }

  // Opened from a link: before anything is connected, the person confirms the workspace
  // by name (a link from someone else would connect their own account to that workspace).
  // From the host app, the host vouches for the workspace: go ahead at once. ``proceed``
  // runs inside the click that confirms (a popup may be opened there).
  function confirmThen(form, item, proceed) {
    if (!fromLink) {
      proceed();
      return;
    }
    var old = form.querySelector(".confirm-workspace");
    if (old) old.remove();
    var submit = form.querySelector("button[type=submit]");
    var box = el("div", { className: "confirm confirm-workspace", role: "group", "aria-label": "Confirm workspace" }, [
      el("p", { className: "question", text: "Connect " + item.display_name + " to the workspace “" + workspace + "”?" }),
      el("p", { className: "note", text: "Only continue if “" + workspace + "” is your workspace. If someone sent you this link, your account would be connected to theirs." }),
    ]);
    var yes = el("button", { type: "button", className: "primary", text: "Connect to " + workspace });
    var no = el("button", { type: "button", className: "secondary", text: "Cancel" });
    box.appendChild(yes);
    box.appendChild(no);
    submit.hidden = true;
    form.appendChild(box);
    yes.focus();
    yes.addEventListener("click", function () {
      box.remove();
      submit.hidden = false;
      proceed();
    });
    no.addEventListener("click", function () {
      box.remove();
      submit.hidden = false;
      submit.focus();
    });
  }

  function formValues(form) {
    var values = {};
    form.querySelectorAll("input, textarea").forEach(function (input) {
      if (input.value !== "") values[input.name] = input.value;
    });
    return values;
  }

  function oauthForm(item) {
    var form = el("form", { className: "connect-form", novalidate: true, "aria-label": "Connect " + item.display_name });
    Object.keys(item.settings || {}).forEach(function (name) {
      form.appendChild(fieldInput(item, name, item.settings[name], "setting"));
    });
    var label = item.status === "reauth_required" ? "Reconnect" : item.status === "not_connected" ? "Connect" : "Reconnect";
    form.appendChild(el("button", { type: "submit", className: "primary", text: label }));
    form.addEventListener("submit", function (event) {
      // Everything up to window.open is synchronous: browsers block popups opened later.
      event.preventDefault();
      clearErrors(form);
      if (!checkFields(form, item.settings || {})) return;
      confirmThen(form, item, function () { signIn(item, form, formValues(form)); });
    });
    return form;
  }

  // Ask for a single-use ticket for this sign-in (settings are checked again there).
  function ticketFor(item, settings, returnTo) {
    var body = { settings: settings };
    if (returnTo) body.return_to = returnTo;
    return api("POST", item.config.trigger, body);
  }

  function ticketFailed(item, form, result) {
    if (result.body && result.body.error) showErrors(form, result.body.error);
    else say("Could not start signing in to " + item.display_name + " (HTTP " + result.status + ").", "error");
  }

  // Open the popup at once (a popup opened after an await is blocked), then hand it the
  // ticket when both are ready: the start page asks for it by postMessage.
  function signIn(item, form, settings) {
    var width = item.config.width || 660;
    var height = item.config.height || 660;
    var left = Math.max(0, (window.screenX || 0) + (window.outerWidth - width) / 2);
    var top = Math.max(0, (window.screenY || 0) + (window.outerHeight - height) / 2);
    var features = "popup,width=" + width + ",height=" + height + ",left=" + left + ",top=" + top;
    var popup = window.open(data.origin + "/oauth/start", "broker-" + item.name, features);
    if (!popup) {
      // Blocked: run the sign-in in this window and come back here afterwards.
      say("Taking you to sign in to " + item.display_name + "…");
      ticketFor(item, settings, window.location.pathname).then(function (result) {
        if (!result.ok) {
          say("");
          ticketFailed(item, form, result);
          return;
        }
        return redeemHere(result.body.ticket);
      }, function () {
        say("Could not reach the server. Check your connection and try again.", "error");
      });
      return;
    }
    // A second click reuses the named window: retire the first watcher, or it would report
    // "closed before it finished" when the (new) flow's window closes after succeeding.
    var previous = popups[item.name];
    if (previous) window.clearInterval(previous.timer);
    var entry = { window: popup, done: false, timer: null, ticket: null, ready: false, sent: false };
    popups[item.name] = entry;
    ticketFor(item, settings, null).then(function (result) {
      if (popups[item.name] !== entry) return;
      if (!result.ok) {
        entry.done = true;
        window.clearInterval(entry.timer);
        popup.close();
        say("");
        ticketFailed(item, form, result);
        return;
      }
      entry.ticket = result.body.ticket;
      handOver(entry);
    }, function () {
      entry.done = true;
      popup.close();
      say("Could not reach the server. Check your connection and try again.", "error");
    });
    say("Finish signing in to " + item.display_name + " in the window that opened.");
    entry.timer = window.setInterval(function () {
      if (!popup.closed) return;
      window.clearInterval(entry.timer);
      // Give a message posted just before closing a moment to arrive.
      window.setTimeout(function () {
        if (!entry.done) {
          say("The sign-in window for " + item.display_name + " was closed before it finished. Nothing was changed.", "error");
        }
      }, 300);
    }, 400);
  }

  function handOver(entry) {
    if (entry.ticket && entry.ready && !entry.sent) {
      entry.sent = true;
      entry.window.postMessage({ type: "broker:start", ticket: entry.ticket }, data.origin);
    }
  }

  // Popups blocked: redeem the ticket from this page and go to the provider in this window.
  function redeemHere(ticket) {
    return fetch("/oauth/start", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ticket: ticket }),
      credentials: "same-origin",
    }).then(function (response) {
      return response.json().then(function (body) {
        if (response.ok && body && typeof body.location === "string") {
          window.location.assign(body.location);
        } else {
          say((body && body.error && body.error.message) || "Could not start signing in.", "error");
        }
      });
    }, function () {
      say("Could not reach the server. Check your connection and try again.", "error");
    });
  }

  // source: the window that posted the result, or null when it came on the channel.
  function onOauthResult(message, source) {
    if (!message || message.type !== "broker:oauth" || typeof message.integration !== "string") return;
    var entry = popups[message.integration];
    if (entry && entry.done) return; // already reported (postMessage and the channel both deliver)
    // Ours: posted by the very window this page opened, or on the channel once that window
    // is out of reach (a Cross-Origin-Opener-Policy severs it and it then reads as closed).
    var ours = entry && (source ? source === entry.window : entry.window.closed);
    if (!ours) {
      // Another tab's flow (maybe another group's, on the shared channel) or one from
      // before a reload: not this page's to announce or to tell the host about. The
      // server has the truth, so just refresh the list.
      refreshSoon();
      return;
    }
    entry.done = true;
    window.clearInterval(entry.timer);
    var item = { name: message.integration, display_name: displayName(message.integration) };
    if (message.status === "connected") {
      finished(item, "connected");
    } else {
      say(String(message.error || "Could not connect."), "error");
      load();
    }
  }

  var refreshTimer = null;
  function refreshSoon() {
    window.clearTimeout(refreshTimer);
    refreshTimer = window.setTimeout(load, 100);
  }

  function displayName(name) {
    var card = document.querySelector('[data-integration="' + CSS.escape(name) + '"]');
    return card ? card.getAttribute("data-display-name") : name;
  }

  function finished(item, status) {
    var verb = status === "connected" ? "connected" : "disconnected";
    say(item.display_name + " is " + verb + ".", "success");
    notifyHost(item.name, status);
    load();
  }

  function disconnectControls(item) {
    var wrap = el("div", { className: "disconnect" });
    var ask = el("button", { type: "button", className: "secondary", text: "Disconnect" });
    var confirmBox = el("div", { className: "confirm", role: "group", "aria-label": "Confirm disconnect", hidden: true }, [
      el("p", { text: "Disconnect " + item.display_name + (fromLink ? " from the workspace “" + workspace + "”" : "") + "? Workflows using it will stop working until it is connected again." }),
    ]);
    var yes = el("button", { type: "button", className: "danger", text: "Yes, disconnect" });
    var no = el("button", { type: "button", className: "secondary", text: "Cancel" });
    confirmBox.appendChild(yes);
    confirmBox.appendChild(no);
    ask.addEventListener("click", function () {
      ask.hidden = true;
      confirmBox.hidden = false;
      no.focus();
    });
    no.addEventListener("click", function () {
      confirmBox.hidden = true;
      ask.hidden = false;
      ask.focus();
    });
    yes.addEventListener("click", function () {
      yes.disabled = true;
      api("POST", item.config.delete).then(function (result) {
        yes.disabled = false;
        if (result.ok) finished(item, "not_connected");
        else say((result.body && result.body.error && result.body.error.message) || "Could not disconnect.", "error");
      }, function () {
        yes.disabled = false;
        say("Could not reach the server. Check your connection and try again.", "error");
      });
    });
    wrap.appendChild(ask);
    wrap.appendChild(confirmBox);
    return wrap;
  }

  function card(item) {
    var status = item.status in LABELS ? item.status : "not_connected";
    var heading = el("div", { className: "card-head" }, [
      logo(item),
      el("div", { className: "title" }, [
        el("h2", { text: item.display_name }),
        el("p", { className: "auth", text: item.auth_title || item.auth_type }),
      ]),
      el("span", { className: "badge " + status, text: LABELS[status] }),
    ]);
    var body = [heading];
    if (item.needed_by && item.needed_by.length) {
      body.push(el("p", { className: "needed", text: "Needed by: " + item.needed_by.join(", ") }));
    }
    if (item.hint && Object.keys(item.hint).length) {
      var parts = Object.keys(item.hint).map(function (k) { return k.replace(/_/g, " ") + " " + item.hint[k]; });
      body.push(el("p", { className: "hint", text: parts.join(" · ") }));
    }
    if (status === "reauth_required") {
      body.push(el("p", { className: "notice warning", text: item.display_name + " stopped accepting the saved sign-in. Reconnect it to keep workflows running." }));
    }
    if (status === "unavailable") {
      body.push(el("p", { className: "notice warning", text: item.display_name + " is not answering right now; the broker keeps retrying." }));
    }
    var popup = item.connect === "popup";
    var needsForm = status === "not_connected" || status === "reauth_required" || !popup;
    if (popup) {
      body.push(oauthForm(item));
    } else if (needsForm && (item.fields && Object.keys(item.fields).length)) {
      if (status === "not_connected") {
        body.push(credentialForm(item));
      } else {
        var details = el("details", {}, [el("summary", { text: "Replace the saved credential" }), credentialForm(item)]);
        body.push(details);
      }
    }
    if (status !== "not_connected") body.push(disconnectControls(item));
    return el("li", { className: "card", "data-integration": item.name, "data-display-name": item.display_name, "data-status": status }, body);
  }

  function load() {
    return api("GET", "/groups/" + encodeURIComponent(groupId) + "/integrations").then(function (result) {
      if (!result.ok) {
        if (result.status === 401) {
          sessionEnded(result.body);
          return;
        }
        list.replaceChildren();
        say("Could not load the integrations (HTTP " + result.status + ").", "error");
        return;
      }
      list.replaceChildren.apply(list, result.body.integrations.map(card));
      document.body.setAttribute("data-loaded", "true");
    }, function () {
      say("Could not reach the server. Check your connection and try again.", "error");
    });
  }

  window.addEventListener("message", function (event) {
    // Only the broker's own pages (the popup's start and result pages) may ask for a
    // ticket or report a result; this also refuses the "null" origin of sandboxed frames
    // and data: URLs.
    if (event.origin !== data.origin) return;
    var message = event.data;
    if (message && message.type === "broker:start-ready") {
      Object.keys(popups).forEach(function (name) {
        var entry = popups[name];
        if (entry.window === event.source && !entry.done) {
          entry.ready = true;
          handOver(entry);
        }
      });
      return;
    }
    onOauthResult(message, event.source);
  });
  if ("BroadcastChannel" in window) {
    // Same-origin fallback when the provider's Cross-Origin-Opener-Policy severed the opener.
    new BroadcastChannel("broker:oauth").addEventListener("message", function (event) {
      onOauthResult(event.data, null);
    });
  }

  // --- the session --------------------------------------------------------------------

  // Nothing but this message on the page (no list, no form).
  function showOnly(message) {
    document.querySelector("header .lead").hidden = true;
    statusLine.hidden = true;
    list.replaceChildren();
    var notice = el("p", { className: "notice error", role: "alert", id: "session-error", text: message });
    list.parentNode.insertBefore(notice, list);
  }

  function sessionEnded(body) {
    try { window.sessionStorage.removeItem(STORE); } catch (e) { /* storage off */ }
    var expired = body && body.error && body.error.reason === "session_expired";
    showOnly(expired
      ? "This link has expired. Go back to the app and open the integrations page again."
      : "This link is not valid. Go back to the app and open the integrations page again.");
  }

  function remember(token, link) {
    session = token;
    fromLink = link;
    // Kept for this tab only, so a reload (or a sign-in run in this window when popups
    // are blocked) comes back to the same session.
    try { window.sessionStorage.setItem(STORE, JSON.stringify({ token: token, link: link })); } catch (e) { /* storage off */ }
  }

  // The session comes from the link (its fragment), from this tab's earlier visit, or
  // from the host app that embeds or opened this page. Calls ``ready`` once it has one.
  function obtainSession(ready) {
    var match = /^#(?:.*&)?session=([^&]*)/.exec(window.location.hash);
    if (match) {
      // Out of the address bar (and so out of history and bookmarks) at once.
      window.history.replaceState(null, "", window.location.pathname);
      remember(decodeURIComponent(match[1]), true);
      ready();
      return;
    }
    var saved = null;
    try { saved = JSON.parse(window.sessionStorage.getItem(STORE) || "null"); } catch (e) { saved = null; }
    if (saved && typeof saved.token === "string") {
      remember(saved.token, saved.link !== false);
      ready();
      return;
    }
    var hosts = [];
    if (window.parent && window.parent !== window) hosts.push(window.parent);
    if (window.opener && !window.opener.closed) hosts.push(window.opener);
    if (!hosts.length || !data.allowed_origins.length) {
      showOnly("Open this page from the app (or from the link it sent you).");
      return;
    }
    var answered = false;
    window.addEventListener("message", function (event) {
      // Only the window that embeds or opened this page, and only on an allowed origin.
      if (answered || hosts.indexOf(event.source) < 0 || data.allowed_origins.indexOf(event.origin) < 0) return;
      var message = event.data;
      if (!message || message.type !== "broker:session" || typeof message.token !== "string") return;
      answered = true;
      remember(message.token, false);
      ready();
    });
    var asked = 0;
    (function ask() {
      if (answered) return;
      if (++asked > 40) {
        showOnly("Open this page from the app (or from the link it sent you).");
        return;
      }
      hosts.forEach(function (host) {
        data.allowed_origins.forEach(function (origin) {
          try { host.postMessage({ type: "broker:connect-ready" }, origin); } catch (e) { /* gone */ }
        });
      });
      window.setTimeout(ask, 250);
    })();
  }

  function start() {
    api("GET", "/connect-sessions/current").then(function (result) {
      if (!result.ok) {
        if (result.status === 401) sessionEnded(result.body);
        else showOnly("Could not open this page (HTTP " + result.status + "). Try again later.");
        return;
      }
      groupId = result.body.group_id;
      workspace = result.body.display_name || result.body.group_id;
      var banner = document.getElementById("workspace");
      banner.replaceChildren(
        document.createTextNode("Workspace: "),
        el("strong", { text: workspace })
      );
      if (fromLink) {
        banner.appendChild(el("span", { className: "link-note", text: " — you opened this page from a link: check that this is your workspace before connecting anything." }));
      }
      banner.hidden = false;
      document.body.setAttribute("data-mode", fromLink ? "link" : "host");
      load();
    }, function () {
      showOnly("Could not reach the server. Check your connection and try again.");
    });
  }

  obtainSession(start);
})();
