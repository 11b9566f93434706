//! A local shop that counts orders: the site the action-rule tests buy from.
//!
//! `GET /` is the shop page (a "Buy" button and `order(amount, path)` for scripts), `GET
//! /browse` a catalogue page, `POST /checkout` places an order, `POST /cart` adds to the cart.
//! Every request is recorded, so a test can count the orders that really arrived and read the
//! headers each one carried.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::bank::{Reply, Request, Server};

/// The shop page. `order(amount, path, signal)` posts a form (abortable with `signal`) and
/// resolves to `OK:<answer>` or `ERR:<why>`; the button orders one book for 40 and shows the
/// outcome in `#result`.
pub const SHOP_PAGE: &str = r#"<!doctype html><html><head><title>shop</title></head><body>
<h1>shop</h1>
<button id="buy" onclick="order(40).then(r => document.querySelector('#result').textContent = r)">Buy</button>
<p id="result"></p>
<script>
window.order = (amount, path = '/checkout', signal) => fetch(path, {
  method: 'POST',
  signal,
  headers: {'Content-Type': 'application/x-www-form-urlencoded'},
  body: 'item=book&amount=' + amount,
}).then(r => r.text()).then(t => 'OK:' + t, e => 'ERR:' + e.message);
</script></body></html>"#;

pub struct Shop {
    pub server: Server,
}

impl Shop {
    pub fn start() -> Shop {
        let orders = Arc::new(AtomicU64::new(0));
        let handler = Arc::new(move |r: &Request| match (r.method.as_str(), r.path()) {
            ("POST", "/checkout") => {
                let n = orders.fetch_add(1, Ordering::SeqCst) + 1;
                Reply::new(200, "text/plain", format!("order {n} placed"))
            }
            ("POST", "/cart") => Reply::new(200, "text/plain", "added"),
            ("GET", "/browse") => {
                Reply::html("<!doctype html><title>catalogue</title><p>books</p>")
            }
            _ => Reply::html(SHOP_PAGE),
        });
        Shop {
            server: Server::serve(TcpListener::bind("127.0.0.1:0").unwrap(), handler),
        }
    }

    pub fn url(&self) -> String {
        format!("http://shop.test:{}/", self.server.port())
    }

    /// Orders that reached the shop.
    pub fn orders(&self) -> Vec<Request> {
        self.posts("/checkout")
    }

    /// POSTs to `path` that reached the shop.
    pub fn posts(&self, path: &str) -> Vec<Request> {
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path() == path)
            .collect()
    }
}
