# usage: python3 node/proxy/bench/resident-pages.py PID BIN
# Which of BIN's code pages are resident in process PID (from /proc/PID/pagemap,
# as root), how many 64 KiB blocks they fall in, and by crate (from nm).
import sys,struct,subprocess,bisect,collections,re
pid=int(sys.argv[1]); binp=sys.argv[2]
maps=[l.split() for l in open(f'/proc/{pid}/maps')]
base=None
for m in maps:
    if len(m)>5 and m[5]==binp and base is None: base=int(m[0].split('-')[0],16)
syms=[]
for line in subprocess.run(['nm','-C','--defined-only','-n',binp],capture_output=True,text=True).stdout.splitlines():
    p=line.split(' ',2)
    if len(p)==3 and p[1] in 'tTwW': syms.append((int(p[0],16),p[2]))
addrs=[a for a,_ in syms]
pm=open(f'/proc/{pid}/pagemap','rb')
for m in maps:
    if len(m)>5 and m[5]==binp and m[1]=='r-xp':
        s,e=[int(x,16) for x in m[0].split('-')]
        n=(e-s)//4096
        pm.seek(s//4096*8); data=pm.read(n*8)
        present=[i for i in range(n) if struct.unpack_from('<Q',data,i*8)[0]>>63]
        print('text pages',n,'present',len(present), 'MB',len(present)*4/1024)
        blocks=collections.Counter(i//16 for i in present)
        print('64K blocks touched',len(blocks),'full',sum(1 for v in blocks.values() if v==16))
        agg=collections.Counter()
        for i in present:
            va=s+i*4096-base
            j=bisect.bisect_right(addrs,va)-1
            name=syms[j][1] if j>=0 else '?'
            n2=name.lstrip('<&*')
            mm=re.match(r'([A-Za-z_][A-Za-z0-9_]*)::',n2)
            agg[mm.group(1) if mm else 'C/other']+=4
        for k,v in agg.most_common(25): print(f'{v:6} KB {k}')
